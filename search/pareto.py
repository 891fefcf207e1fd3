"""`python -m search.pareto`: the distributed Pareto sweep (search.driver does the work)."""
from __future__ import annotations

from search.driver import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
