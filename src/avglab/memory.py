"""``python -m avglab.memory``: the command's old name, kept working; it lives in ``avglab.tools.memory``."""

from avglab.tools.memory import main

if __name__ == "__main__":
    raise SystemExit(main())
