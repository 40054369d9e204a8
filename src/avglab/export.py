"""``python -m avglab.export``: the command's old name, kept working; it lives in ``avglab.tools.export``."""

from avglab.tools.export import main

if __name__ == "__main__":
    raise SystemExit(main())
