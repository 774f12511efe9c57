"""A link command for the Remote Copy tests: runs the real link command as a
child and relays its stdin at a rate read from RATE_FILE before each chunk
(bytes/s, 0 = no limit), and its stdout back. Writes its pid to PID_FILE so a test can kill
"the link" in the middle of a transfer.

usage: rcopy_relay.py RATE_FILE PID_FILE -- COMMAND...
"""

import os
import subprocess
import sys
import threading
import time


def main() -> None:
    rate_file, pid_file = sys.argv[1], sys.argv[2]
    cmd = sys.argv[sys.argv.index("--") + 1:]
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def back() -> None:
        while chunk := os.read(child.stdout.fileno(), 65536):
            os.write(1, chunk)

    t = threading.Thread(target=back, daemon=True)
    t.start()
    due = 0.0  # when the bytes relayed so far may have passed at the current rate
    try:
        while chunk := os.read(0, 65536):
            child.stdin.write(chunk)
            child.stdin.flush()
            try:
                rate = int(open(rate_file).read().strip() or 0)
            except (OSError, ValueError):
                rate = 0
            if rate:
                # No credit for time spent waiting (for the receiver's start or its
                # `ready`): the rate caps every stretch, and a new rate applies at once.
                now = time.monotonic()
                due = max(due, now) + len(chunk) / rate
                time.sleep(due - now)
    except BrokenPipeError:
        pass
    try:
        child.stdin.close()
    except BrokenPipeError:
        pass
    rc = child.wait()
    t.join()
    sys.exit(rc)


if __name__ == "__main__":
    main()
