"""benchmarks/gpu_throughput.py: floor_ratio's definition (a PGD-k epoch is k + 1
forward/backward passes per batch, a plain one is one) holds for the runs it times, and the
script runs on the CPU in its quick form with the figures as the last stdout line."""
import importlib.util
import json
import math
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_throughput.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_throughput", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _forwards_per_batch(run) -> float:
    calls = []
    handle = run.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        run.train_epoch()
    finally:
        handle.remove()
    return len(calls) / run.steps_per_epoch()


@pytest.mark.parametrize("steps", [1, 3])
def test_the_plain_and_pgd_epochs_are_one_and_k_plus_one_passes_per_batch(steps, monkeypatch):
    from trainables import quant

    # the compile option's Run wraps the BR target for torch.compile (a class attribute): restored after
    monkeypatch.setattr(quant._BRWeight, "target", quant._BRWeight.target)
    gt = _load()
    a = Namespace(depth=8, width=4, batch=8, device="cpu", bits=4)
    data = gt.synthetic(16, size=16)
    assert _forwards_per_batch(gt.make_run(a, data, 0)) == 1  # eps 0: no attack
    pgd = gt.make_run(a, data, steps)
    assert (pgd.cfg.loss, pgd.cfg.quant.bits, pgd.br.enabled) == ("madry", 4, True)
    assert _forwards_per_batch(pgd) == steps + 1
    for name, over in gt.OPTIONS.items():  # each option changes its one setting and nothing else
        run = gt.make_run(a, data, steps, **over)
        changed = {k for k in vars(pgd.cfg) if getattr(run.cfg, k) != getattr(pgd.cfg, k)}
        assert changed == set(over), name


@pytest.mark.slow  # end to end (subprocesses); docs/testing.md
def test_gpu_throughput_quick_on_cpu_prints_the_json_last():
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick"],
                         capture_output=True, text=True, timeout=900, check=True).stdout
    print(out)  # the figures, with pytest -s
    r = json.loads(out.strip().splitlines()[-1])
    assert r["device"] == "cpu" and r["attack_steps"] == 10
    for key in ("plain_img_s", "pgd_img_s", "floor_ratio", "packed_speedup"):
        assert math.isfinite(r[key]), key
    assert {"fp32", "bf16"} <= set(r["options"])
    assert sorted(p["trials"] for p in r["packed"]) == [1, 2]
