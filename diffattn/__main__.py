"""``python -m diffattn ...``: the ``diffattn`` command (see ``diffattn/cli.py``), from any directory."""

import sys

from .cli import module_main

if __name__ == "__main__":
    sys.exit(module_main())
