"""`python -m search.export`: one trial's model as a small packed file, checked against the
trained model (search.posthoc finds the trial; trainables.export packs it)."""
from __future__ import annotations

from search.posthoc import export_main as main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
