"""search.report: the findings report at a tiny scale, and its verdict rules on synthetic numbers."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from search import report

CIFAR10_JPEG = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-jpeg.tar.gz"
TINY = ["--subset-train", "200", "--subset-test", "40", "--depth", "8", "--width", "4",
        "--epochs", "1", "--attack-steps", "1", "--eval-steps", "2", "--eval-seeds", "2",
        "--batch-size", "64", "--jobs", "1", "--threads", "1", "--quiet"]


def _check_markdown(text: str, rows: list[str]) -> None:
    # the table: header with every metric column, one line per row (float rows come along)
    header = next(line for line in text.splitlines() if line.startswith("| row |"))
    for col in ("clean", "FGSM", "PGD-2", "CW-L∞", "transfer PGD-2", "weight sparsity",
                "channel sparsity", "size", "masking flag"):
        assert col in header
    for r in rows:
        line = next(line for line in text.splitlines() if line.startswith(f"| `{r}` |"))
        assert re.search(r"\d+\.\d ± \d+\.\d", line), line
        quantized = not r.startswith("float")
        # quantized rows carry a transfer accuracy and a flag verdict; float rows do neither
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert (cells[header.strip("|").split("|").index(" transfer PGD-2 ")] != "–") == quantized
        assert (cells[-1] in ("ok", "**FLAG**")) == quantized
    # claims with computed verdicts, the guard section, and how to regenerate
    assert "## The paper's claims at this scale" in text
    for claim in ("(a)", "(b)", "(c)"):
        assert re.search(re.escape(claim) + r".*Verdict: \*\*(holds|partly holds|does not hold|not tested)", text)
    assert "### Gradient-masking guard" in text
    assert "## How to regenerate" in text and "python -m search.report" in text
    assert "needs the full setting" in text  # the EnResNet comparison is not made at this scale
    for field in ("Git SHA:", "Wall time:", "Machine:", "Date (UTC):", "Command:"):
        assert field in text


def test_report_tiny_cifar(tmp_path):
    if not CIFAR10_JPEG.is_file():
        pytest.skip(f"{CIFAR10_JPEG} not found")
    out = tmp_path / "findings.md"
    rc = report.main(TINY + ["--cifar", str(CIFAR10_JPEG), "--cache-dir", str(tmp_path / "cache"),
                             "--rows", "ternary-madry,ternary-mix", "--out", str(out)])
    assert rc == 0
    text = out.read_text()
    assert text.startswith("# Findings") and "CIFAR-10" in text
    _check_markdown(text, ["float-madry", "ternary-madry", "float-mix", "ternary-mix"])
    assert "Verdict: **holds" in text.split("**(a)")[1].split("**(b)")[0]  # ternary is sparse


def test_report_digits_with_en2_and_json(tmp_path):
    out, js = tmp_path / "f.md", tmp_path / "f.json"
    rc = report.main(TINY + ["--dataset", "digits", "--rows", "binary-madry,float-madry-en2", "--jobs", "2",
                             "--out", str(out), "--json", str(js), "--work-dir", str(tmp_path / "w")])
    assert rc == 0
    text = out.read_text()
    _check_markdown(text, ["float-madry", "binary-madry", "float-madry-en2"])
    assert "### En1 against En2" in text
    # a rerun with the same settings reuses every finished row from --work-dir
    before = js.read_text()
    rc = report.main(TINY + ["--dataset", "digits", "--rows", "binary-madry,float-madry-en2", "--jobs", "2",
                             "--out", str(out), "--json", str(js), "--work-dir", str(tmp_path / "w")])
    assert rc == 0
    import json
    assert json.loads(js.read_text())["rows"] == json.loads(before)["rows"]


def test_bad_row_is_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        report.main(["--dataset", "digits", "--rows", "nope"])
    assert e.value.code == 2
    assert "unknown row 'nope'" in capsys.readouterr().err


# --- verdict rules on synthetic numbers ---------------------------------------------------


def _row(clean, fgsm, pgd, cw, ws, ch, transfer=None):
    per = {"clean": [clean] * 3, "fgsm": [fgsm] * 3, "pgd": [pgd] * 3, "cw": [cw] * 3}
    if transfer is not None:
        per["transfer"] = [transfer] * 3
    return {"per_seed": per, "structure": {"weight_sparsity": ws, "channel_sparsity": ch,
                                           "channel_sparsity_in": ch}}


def test_masking_flag():
    assert report.masking_flag(_row(50, 30, 40, 30, 0.4, 0.0, transfer=35)) is True
    assert report.masking_flag(_row(50, 30, 25, 30, 0.4, 0.0, transfer=35)) is False
    assert report.masking_flag(_row(50, 30, 25, 30, 0.0, 0.0)) is None


def test_verdicts_follow_the_thresholds():
    R = {
        "float-madry": _row(40, 30, 25, 24, 0.0, 0.0),
        "4bit-madry": _row(38, 29, 24, 23, 0.20, 0.01, 30),
        "ternary-madry": _row(36, 28, 23, 22, 0.42, 0.02, 30),
        "float-mix": _row(44, 30, 24, 23, 0.10, 0.10),
        "4bit-mix": _row(42, 29, 22, 22, 0.30, 0.12, 30),
        "ternary-mix": _row(40, 28, 21, 20, 0.50, 0.15, 30),
    }
    assert report.verdict_a(R).status == "holds"
    assert report.verdict_b(R).status == "holds"
    c = report.verdict_c(R, 0.01, 0.2)
    assert c.status.startswith("holds") and "binary-madry/mix" in c.status
    # structured sparsity (channels close to weights) breaks (b); a clean drop breaks (c)
    R["ternary-madry"] = _row(36, 28, 23, 22, 0.42, 0.30, 30)
    assert report.verdict_b(R).status == "partly holds"
    R["ternary-mix"] = _row(30, 28, 21, 20, 0.50, 0.40, 30)
    c = report.verdict_c(R, 0.01, 0.2)
    assert c.status.startswith("partly holds") and any("fails on: clean" in s for s in c.lines)
    R["4bit-madry"] = _row(38, 29, 24, 23, 0.05, 0.0, 30)
    R["ternary-madry"] = _row(36, 28, 23, 22, 0.02, 0.0, 30)
    assert report.verdict_a(R).status == "does not hold"


def test_select_rows_brings_the_transfer_source():
    ids = [r.id for r in report.select_rows(["binary-mix"])]
    assert ids == ["float-mix", "binary-mix"]
    assert len(report.select_rows(None)) == 9
