"""Run the mlserve CLI and SIGKILL it just before its K-th filesystem operation under MLSERVE_HOME.

Usage: ``python tests/crashpoint.py K mlserve-args...``. K = 0 never kills; the number of operations
seen is printed to stderr as ``crashpoints=N`` at exit, so a test can try every K from 1 to N.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys

# mkdir is left out: dying before it is the same as dying before the next operation.
EVENTS = {"open", "os.rename", "os.remove", "os.chmod", "os.link", "os.rmdir", "os.truncate"}


def main() -> None:
    home = os.path.realpath(os.environ["MLSERVE_HOME"])
    target = int(sys.argv[1])
    seen = 0

    def hook(event: str, args: tuple[object, ...]) -> None:
        nonlocal seen
        if event not in EVENTS or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        if not os.path.abspath(os.fsdecode(args[0])).startswith(home):  # type: ignore[arg-type]
            return
        seen += 1
        if seen == target:
            os.kill(os.getpid(), signal.SIGKILL)

    atexit.register(lambda: sys.stderr.write(f"crashpoints={seen}\n"))
    sys.argv = ["mlserve", *sys.argv[2:]]
    sys.addaudithook(hook)
    from mlserve.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
