"""The one exception type the user sees, with the exit code it maps to."""

from __future__ import annotations

# Exit codes of the `vmd` command.
EXIT_OK = 0
EXIT_ERROR = 1  # a request failed (bad argument, refused operation)
EXIT_USAGE = 2  # bad command line (argparse's own code)
EXIT_CONFIG = 3  # bad configuration: nothing was mounted
EXIT_NO_DAEMON = 4  # no daemon answers on the admin socket


class VmdError(Exception):
    """An error reported to the user as one line, with an exit code."""

    exit_code = EXIT_ERROR


class ConfigError(VmdError):
    exit_code = EXIT_CONFIG


class NotRunningError(VmdError):
    exit_code = EXIT_NO_DAEMON


class SidecarError(VmdError):
    """The sidecar log cannot be trusted; the volume is refused (invariant 4)."""
