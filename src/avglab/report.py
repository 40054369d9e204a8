"""``python -m avglab.report``: the command's old name, kept working; it lives in ``avglab.tools.report``."""

from avglab.tools.report import main

if __name__ == "__main__":
    raise SystemExit(main())
