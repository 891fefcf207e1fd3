"""`python -m search.pick`: one model chosen from a sweep's front by a rule, exported, re-checked in
onnxruntime and registered (search.posthoc picks; trainables.export and onnx_export write the files);
`--compare A,B` plots several sweeps' fronts together."""
from __future__ import annotations

from search.posthoc import pick_main as main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
