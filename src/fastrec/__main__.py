"""Command line: ``python -m fastrec <command> [options]``.

Commands:
  demo    simulated federated evaluation with finalize-then-sample metrics (see fastrec.demo)
"""

from __future__ import annotations

import os
import sys


def _demo(argv):
    from .demo import main
    return main(argv)


COMMANDS = {"demo": _demo}


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv[0]`` to its command; usage on stderr and status 2 if unknown."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] in ("-h", "--help"):
            print(__doc__)
            return 0
        print(__doc__, file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    try:
        status = main()
        sys.stdout.flush()  # a buffered stdout meets the closed pipe here, inside the try
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, like other command-line tools.
        # Point stdout at devnull so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    sys.exit(status)
