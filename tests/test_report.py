"""The `report` package (`python -m report`): the findings report at a tiny scale with the strong
suite, and its verdict rules and sanity-flag rendering on synthetic numbers."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from report import cli, grid, verdicts

CIFAR10_JPEG = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-jpeg.tar.gz"
TINY = ["--subset-train", "200", "--subset-test", "40", "--depth", "8", "--width", "4",
        "--epochs", "1", "--attack-steps", "1", "--eval-steps", "2", "--eval-seeds", "2",
        "--batch-size", "64", "--jobs", "1", "--threads", "1", "--quiet",
        "--aa-steps", "2", "--aa-eot", "2", "--square-queries", "30", "--eot-samples", "2", "--eot-steps", "3"]


def _check_markdown(text: str, rows: list[str]) -> None:
    # the table: header with every metric column, one line per row (float rows come along)
    header = next(line for line in text.splitlines() if line.startswith("| row |"))
    aa = "APGD-CE+DLR (2 it., EOT 2)"  # TINY's cheaper settings are never labelled AutoAttack-rand
    assert "| AutoAttack-rand |" not in text and "not AutoAttack-rand" in text
    for col in ("clean", "FGSM", "PGD-2", "CW-L∞", "suite clean", "EOT-PGD-3", aa, "Square", "worst case",
                "transfer PGD-2", "weight sparsity", "channel sparsity", "size", "sanity flags"):
        assert col in header, col
    names = [c.strip() for c in header.strip().strip("|").split("|")]
    for r in rows:
        line = next(line for line in text.splitlines() if line.startswith(f"| `{r}` |"))
        assert re.search(r"\d+\.\d ± \d+\.\d", line), line
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        strong = {}
        for col in ("suite clean", aa, "Square", "EOT-PGD-3", "worst case"):
            assert re.fullmatch(r"\d+\.\d", cells[names.index(col)]), (col, line)
            strong[col] = float(cells[names.index(col)])
        # one scoring on the same images: no attack above the suite's clean, the worst case below all
        assert all(strong["worst case"] <= v <= strong["suite clean"] for v in strong.values()), line
        # quantized rows carry a transfer accuracy; every row carries its flags (or "none")
        assert (cells[names.index("transfer PGD-2")] != "–") == (not r.startswith("float")), line
        assert cells[-1] == "none" or cells[-1].startswith("**"), line
    # claims with computed verdicts, the sanity battery, and how to regenerate
    assert "## The paper's claims at this scale" in text
    for claim in ("(a)", "(b)", "(c)"):
        assert re.search(re.escape(claim) + r".*Verdict: \*\*(holds|partly holds|does not hold|not tested)", text)
    assert "### Sanity battery (Carlini et al. 2019)" in text
    for flag in verdicts.FLAGS:
        assert f"`{flag}`" in text
    assert "## How to regenerate" in text and "python -m report" in text
    assert "needs the full setting" in text  # the EnResNet comparison is not made at this scale
    for field in ("Git SHA:", "Wall time:", "Machine:", "Command:", "Strong suite cost"):
        assert field in text
    assert "Date (UTC):" not in text  # a generated file carries no date: git records when it was made


@pytest.mark.slow
def test_report_tiny_cifar(tmp_path):
    if not CIFAR10_JPEG.is_file():
        pytest.skip(f"{CIFAR10_JPEG} not found")
    out = tmp_path / "findings.md"
    rc = cli.main(TINY + ["--cifar", str(CIFAR10_JPEG), "--cache-dir", str(tmp_path / "cache"),
                          "--rows", "ternary-madry,ternary-mix", "--out", str(out)])
    assert rc == 0
    text = out.read_text()
    assert text.startswith("# Findings") and "CIFAR-10" in text
    _check_markdown(text, ["float-madry", "ternary-madry", "float-mix", "ternary-mix"])
    assert "Verdict: **holds" in text.split("**(a)")[1].split("**(b)")[0]  # ternary is sparse


@pytest.mark.slow
def test_report_digits_with_en2_json_and_previous(tmp_path):
    out, js, prev = tmp_path / "f.md", tmp_path / "f.json", tmp_path / "old.md"
    prev.write_text("| row | model | clean | PGD-20 |\n|---|---|---|---|\n| `float-madry` | En1 | 50.0 ± 1.0 | 30.0 ± 1.0 |\n\n"
                    "**(a) Ternary and 4-bit BR make the weights sparse.** Verdict: **holds**.\n\n"
                    "**(c) The trade-off loss ...** Verdict: **does not hold**.\n")
    args = TINY + ["--dataset", "digits", "--rows", "binary-madry,float-madry-en2", "--jobs", "2",
                   "--out", str(out), "--json", str(js), "--work-dir", str(tmp_path / "w"), "--strong-subset", "30"]
    assert cli.main(args + ["--previous", str(prev)]) == 0
    text = out.read_text()
    _check_markdown(text, ["float-madry", "binary-madry", "float-madry-en2"])
    assert "### En1 against En2" in text
    assert "first 30 of them" in text
    # what changed: the verdicts and the figures compared with the previous file (the code's
    # changes are in git, not in the report)
    changes = text.split("## What changed since the previous version")[1].split("## Run")[0]
    assert "(a) holds -> **not tested**" in changes and "(c) does not hold -> **not tested**" in changes
    assert re.search(r"`float-madry` clean [+-]\d+\.\d pp, PGD-20 [+-]\d+\.\d pp", changes)
    rows = json.loads(js.read_text())["rows"]
    assert all(r["strong"]["n_images"] == 30 for r in rows.values())
    # a rerun with the same settings reuses every finished row from --work-dir
    assert cli.main(args) == 0
    assert json.loads(js.read_text())["rows"] == rows


def test_bad_input_is_one_line_error(capsys):
    for argv, msg in ((["--rows", "nope"], "unknown row 'nope'"), (["--aa-eot", "0"], "--aa-eot=0"),
                      (["--strong-subset", "-1"], "--strong-subset=-1")):
        with pytest.raises(SystemExit) as e:
            cli.main(["--dataset", "digits", *argv])
        assert e.value.code == 2
        assert msg in capsys.readouterr().err


# --- verdict rules on synthetic numbers ---------------------------------------------------


def _row(clean, fgsm, pgd, cw, ws, ch, transfer=None, aa=None, flags=()):
    per = {"clean": [clean] * 3, "fgsm": [fgsm] * 3, "pgd": [pgd] * 3, "cw": [cw] * 3}
    if transfer is not None:
        per["transfer"] = [transfer] * 3
    strong = {"aa_acc": (pgd if aa is None else aa) / 100, **{f: f in flags for f in verdicts.FLAGS}}
    return {"per_seed": per, "strong": strong,
            "structure": {"weight_sparsity": ws, "channel_sparsity": ch, "channel_sparsity_in": ch}}


def test_tripped_flags():
    assert verdicts.tripped(_row(50, 30, 40, 30, 0.4, 0.0, flags=("flag_blackbox",))) == ["flag_blackbox"]
    assert verdicts.tripped(_row(50, 30, 40, 30, 0.4, 0.0)) == []


def test_verdicts_follow_the_thresholds():
    R = {
        "float-madry": _row(40, 30, 25, 24, 0.0, 0.0),
        "4bit-madry": _row(38, 29, 24, 23, 0.20, 0.01, 30),
        "ternary-madry": _row(36, 28, 23, 22, 0.42, 0.02, 30),
        "float-mix": _row(44, 30, 24, 23, 0.10, 0.10),
        "4bit-mix": _row(42, 29, 22, 22, 0.30, 0.12, 30),
        "ternary-mix": _row(40, 28, 21, 20, 0.50, 0.15, 30),
    }
    assert verdicts.verdict_a(R).status == "holds"
    assert verdicts.verdict_b(R).status == "holds"
    c = verdicts.verdict_c(R, 0.01, 0.2)
    assert c.status.startswith("holds") and "binary-madry/mix" in c.status
    # a large drop under AutoAttack-rand alone breaks (c) for that width
    R2 = dict(R, **{"4bit-mix": _row(42, 29, 22, 22, 0.30, 0.12, 30, aa=10)})
    c = verdicts.verdict_c(R2, 0.01, 0.2)
    assert c.status.startswith("partly holds") and any("fails on: aa" in s for s in c.lines)
    # a tripped flag is called out next to the numbers it puts in doubt
    R3 = dict(R, **{"ternary-mix": _row(40, 28, 21, 20, 0.50, 0.15, 30, flags=("flag_eot",))})
    assert any("ternary-mix trips flag_eot" in s for s in verdicts.verdict_c(R3, 0.01, 0.2).lines)
    # structured sparsity (channels close to weights) breaks (b); a clean drop breaks (c)
    R["ternary-madry"] = _row(36, 28, 23, 22, 0.42, 0.30, 30)
    assert verdicts.verdict_b(R).status == "partly holds"
    R["ternary-mix"] = _row(30, 28, 21, 20, 0.50, 0.40, 30)
    c = verdicts.verdict_c(R, 0.01, 0.2)
    assert c.status.startswith("partly holds") and any("fails on: clean" in s for s in c.lines)
    R["4bit-madry"] = _row(38, 29, 24, 23, 0.05, 0.0, 30)
    R["ternary-madry"] = _row(36, 28, 23, 22, 0.02, 0.0, 30)
    assert verdicts.verdict_a(R).status == "does not hold"


def test_select_rows_brings_the_transfer_source():
    ids = [r.id for r in grid.select_rows(["binary-mix"])]
    assert ids == ["float-mix", "binary-mix"]
    assert len(grid.select_rows(None)) == 9
