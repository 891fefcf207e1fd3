"""benchmarks/step_overhead.py: the three configurations it times are the ones its labels name,
and the script runs as documented with its figures as the last stdout line."""
import importlib.util
import json
import math
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_overhead.py"


def _load():
    spec = importlib.util.spec_from_file_location("step_overhead", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_timed_configurations_are_what_the_labels_say():
    """ratio = BR step / float Madry step is only the overhead of BR (4-bit relaxed weights),
    the group penalty and the mix loss if the three runs differ in exactly those and share the
    model, batch and attack."""
    so = _load()
    args = Namespace(depth=8, width=4, noise=0.1, batch=4, device="cpu", steps=2)
    data = so.random_data(args.batch)
    runs = {name: so.build(name, args, data) for name in so.CONFIGS}
    br, mix, madry = runs["br"], runs["float_mix"], runs["float_madry"]
    assert (br.cfg.quant.bits, br.cfg.loss, br.cfg.group_mode) == (4, "mix", "penalty") and br.cfg.group_lasso > 0
    assert br.br.enabled and br.br.state.mode == "relaxed"  # phase I: relaxed weights every step
    assert (mix.cfg.quant.bits, mix.cfg.loss, mix.cfg.group_lasso) == (32, "mix", 0.0) and not mix.br.enabled
    assert (madry.cfg.quant.bits, madry.cfg.loss, madry.cfg.group_lasso) == (32, "madry", 0.0)
    for run in runs.values():
        assert run.cfg.train_attack.steps == 2 and run.cfg.batch_size == 4 and run.model.training
        assert sum(p.numel() for p in run.model.parameters()) == sum(p.numel() for p in madry.model.parameters())


@pytest.mark.slow  # a subprocess
def test_step_overhead_prints_the_figures_json_last():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--depth", "8", "--width", "4",
         "--batch", "8", "--steps", "2", "--rounds", "3", "--warmup", "1"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("ratio", "ratio_vs_float_mix", "step_ms_br", "step_ms_float_mix", "step_ms_float_madry"):
        assert math.isfinite(result[key]), key
    assert (result["attack_steps"], result["device"], result["batch"], result["rounds"]) == (2, "cpu", 8, 3)
    assert result["threads"] == 1  # the suite's one thread per process reached the script
