"""`python -m search.evaluate --name NAME`: the strong evaluation of a finished sweep's front
(search.posthoc does the work)."""
from __future__ import annotations

from search.posthoc import evaluate_main as main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
