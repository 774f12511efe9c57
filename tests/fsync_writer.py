"""A writer for the durability tests: appends numbered records to a file and
prints each record's number on stdout once an fsync covering it returned, so
whatever the test reads from the pipe was acknowledged as durable.

usage: fsync_writer.py FILE TAG BATCH
  TAG    distinguishes the rounds' records (the content depends on it)
  BATCH  records written between two fsyncs

Runs until killed or until a write or fsync fails (the daemon under the
filesystem died): it then exits 1 with the error on stderr.
"""

from __future__ import annotations

import hashlib
import os
import sys

# Not a divisor of the 4 KiB page: records straddle pages and blocks, so the
# partial-page read-modify-write paths of every cache layer are exercised.
RECORD = 997


def record(tag: str, n: int) -> bytes:
    """Record n of round `tag`: its number, then bytes derived from both."""
    head = f"{tag}:{n:08d}:".encode()
    seed = hashlib.sha256(head).digest()
    body = (seed * (RECORD // len(seed) + 1))[:RECORD - len(head) - 1]
    return head + body + b"\n"


def main() -> None:
    path, tag, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    # The new file's directory entry must be durable too, or its records are
    # unreachable after a crash even though their blocks are.
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
    n = 0
    try:
        while True:
            for _ in range(batch):
                os.write(fd, record(tag, n))
                n += 1
            os.fsync(fd)
            sys.stdout.write(f"{n - 1}\n")
            sys.stdout.flush()
    except OSError as e:
        print(f"fsync_writer: {path}: record {n}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
