"""The one exception type the user sees, with the exit code it maps to."""

from __future__ import annotations

import signal

# Exit codes of the `vmd` command, listed once: docs/commands.md shows this
# table (vmd/cli_docs.py), and the tests import the constants.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_NO_DAEMON = 4
EXIT_NOT_REDUNDANT = 5
EXIT_INTERRUPTED = 128 + signal.SIGINT  # as the shell reports a command SIGINT killed
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # as the shell reports a command SIGPIPE killed

EXIT_MEANINGS: dict[int, str] = {
    EXIT_OK: "done",
    EXIT_ERROR: "a request was refused or failed (bad argument, wrong state); nothing changed "
                "unless the message says so",
    EXIT_USAGE: "bad command line (argparse's usage message)",
    EXIT_CONFIG: "`vmd daemon`: bad configuration, or a file, socket or mountpoint another "
                 "daemon holds; nothing was mounted",
    EXIT_NO_DAEMON: "no daemon answers on the admin socket (none runs, or it did not answer "
                    "within `vmd --timeout`)",
    EXIT_NOT_REDUNDANT: "`vmd wait`: no resync runs and none failed, but a plex or column is "
                        "out (the volume is not redundant in full)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C, 128 + SIGINT)",
    EXIT_BROKEN_PIPE: "output into a pipe whose reader has gone (`vmd inspect-log LOG | head -1` "
                      "when the output is longer than the pipe holds), ended quietly as SIGPIPE "
                      "would (128 + SIGPIPE)",
}


class VmdError(Exception):
    """An error reported to the user as one line, with an exit code."""

    exit_code = EXIT_ERROR


class ConfigError(VmdError):
    exit_code = EXIT_CONFIG


class NotRunningError(VmdError):
    exit_code = EXIT_NO_DAEMON


class NotRedundant(VmdError):
    """`vmd wait`: nothing left to copy, but not every plex is in. Its own
    code, so that a script tells it from a resync that failed (exit 1)."""

    exit_code = EXIT_NOT_REDUNDANT


class SidecarError(VmdError):
    """The sidecar log cannot be trusted; the volume is refused (invariant 4)."""
