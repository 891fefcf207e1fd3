"""Search spaces as data. `paper` is the default; users bring their own as a .py file defining
SPACE (same schema) or a define-by-run `space(trial)` function, or as a YAML file."""
