"""`python -m search.report`: an alias of `python -m report` (the findings report moved to its
own package, `report/`, in issue #13)."""
from __future__ import annotations

from report.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
