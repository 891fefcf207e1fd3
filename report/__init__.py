"""The findings report: a fixed grid of Binary-Relax EnResNet rows trained and evaluated with the
strong suite (trainables.robust_eval), verdicts on the paper's claims, written to docs/findings.md.

One job per module: `grid` (scales, rows, configs), `rows` (training one row), `evaluation`
(the seeded attacks, the transfer attack and the strong suite of one row), `verdicts` (the rules
applied to the numbers), `render` (Markdown), `cli` (`python -m report`).
It uses none of Ray, Optuna or MLflow.
"""
