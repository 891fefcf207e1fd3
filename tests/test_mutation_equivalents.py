"""The mutation triage (tests/mutation_equivalents.toml) against mutmut's current mutants.

Runs where a mutation run left `mutants/` (docs/testing.md, "Mutation testing"); skipped
elsewhere. Every listed survivor must still be the mutation it was judged on: its name exists,
it still survives, and the sha256 of its diff (`mutmut show NAME`, the file names left out) is the
one recorded, so a mutant renumbered or changed by an edit of its function fails here instead of
silently keeping an old reason. Every current survivor must be listed, and the kill rate over the
mutants not judged equivalent must reach the target.

To list a new survivor, after judging it: `python tests/test_mutation_equivalents.py NAME...`
prints its entry with the hash, for the reason to be written in.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
TRIAGE = REPO / "tests" / "mutation_equivalents.toml"
MUTANTS = REPO / "mutants"
KINDS = ("equivalent", "device_only")  # device_only: survivors only a CUDA run can kill (not equivalent)
TARGET = 0.95  # killed / (mutants - equivalent)
KILLED = {1, 3, 36, 37, -24, 24, 152, 255}  # mutmut's exit codes for killed, timeout, type check


def _metas() -> dict[str, Path]:
    """mutant name -> its source path, for every mutant of the last run."""
    out = {}
    for meta in sorted(MUTANTS.rglob("*.py.meta")):
        path = meta.relative_to(MUTANTS).with_suffix("")  # drop .meta
        for name in json.loads(meta.read_text())["exit_code_by_key"]:
            out[name] = path
    return out


def _exit_codes() -> dict[str, int | None]:
    out = {}
    for meta in sorted(MUTANTS.rglob("*.py.meta")):
        out.update(json.loads(meta.read_text())["exit_code_by_key"])
    return out


def diff_hash(name: str, path: Path) -> str:
    """sha256 of the mutant's diff against its function, without the two file-name lines."""
    from mutmut.__main__ import get_diff_for_mutant

    diff = get_diff_for_mutant(name, path=path).splitlines()
    return hashlib.sha256("\n".join(diff[2:]).encode()).hexdigest()


def load_triage() -> list[dict]:
    entries = tomllib.loads(TRIAGE.read_text())["survivor"]
    for e in entries:
        assert set(e) == {"name", "kind", "diff_sha256", "reason"}, e
        assert e["kind"] in KINDS and e["reason"].strip(), e
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), "a name is listed twice"
    return entries


def test_the_triage_file_is_well_formed():
    assert load_triage()


@pytest.fixture(scope="module")
def run():
    if not any(MUTANTS.rglob("*.py.meta")):
        pytest.skip("no mutants/: run mutmut first (docs/testing.md)")
    pytest.importorskip("mutmut")
    return _metas(), _exit_codes()


def test_every_listed_survivor_is_still_the_mutation_judged(run, monkeypatch):
    paths, codes = run
    monkeypatch.chdir(REPO)  # mutmut reads mutants/ relative to the working directory
    stale = []
    for e in load_triage():
        name = e["name"]
        if name not in paths:
            stale.append(f"{name}: no such mutant now")
        elif codes[name] != 0:
            stale.append(f"{name}: not a survivor now (exit code {codes[name]})")
        elif diff_hash(name, paths[name]) != e["diff_sha256"]:
            stale.append(f"{name}: its mutation changed (mutmut show {name}); judge it again")
    assert not stale, "\n".join(stale)


def test_every_survivor_is_listed_and_the_kill_rate_meets_the_target(run):
    _, codes = run
    listed = {e["name"]: e["kind"] for e in load_triage()}
    unchecked = [n for n, c in codes.items() if c is None]
    assert not unchecked, f"{len(unchecked)} mutants not checked: the run did not finish"
    survivors = {n for n, c in codes.items() if c not in KILLED}
    untriaged = sorted(survivors - set(listed))
    equivalent = sum(k == "equivalent" for k in listed.values())
    killed = len(codes) - len(survivors)
    rate = killed / (len(codes) - equivalent)
    assert not untriaged, f"survivors neither killed nor listed: {untriaged}"
    assert rate >= TARGET, f"kill rate {rate:.3f} < {TARGET}"


if __name__ == "__main__":  # print entries for NAMEs, with their hashes
    import os

    os.chdir(REPO)
    paths = _metas()
    for name in sys.argv[1:]:
        print(f'[[survivor]]\nname = "{name}"\nkind = "equivalent"\n'
              f'diff_sha256 = "{diff_hash(name, paths[name])}"\nreason = ""\n')
