"""`python -m trainables.train` end to end, in subprocesses: a ternary run, kill-and-resume, and
rejection of bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

FINAL_KEYS = ("clean_acc", "robust_acc", "fgsm_acc", "weight_sparsity", "channel_sparsity",
              "channel_sparsity_in", "size_bits", "compression", "epoch",
              "test_clean_acc", "test_robust_acc", "test_fgsm_acc", "test_cw_acc")
SMALL = ["--dataset", "digits", "--subset-train", "400", "--subset-test", "200",
         "--depth", "8", "--width", "8", "--batch-size", "32"]
TERNARY = SMALL + ["--epochs", "2", "--bits", "2", "--phase2-start", "0.5", "--seed", "0"]
# on a machine with CUDA the same runs go to the GPU, where exact resume needs --deterministic
if torch.cuda.is_available():
    TERNARY += ["--device", "cuda", "--deterministic"]
# depth 8: the stem and the two 3x3 convs of each of the three blocks are quantized
QUANTIZED = ["members.0.conv1.weight"] + [
    f"members.0.blocks.{b}.conv{c}.weight" for b in range(3) for c in (1, 2)]
SHORTCUTS = ["members.0.blocks.1.shortcut.weight", "members.0.blocks.2.shortcut.weight"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainables.train", *args]


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ternary_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ternary") / "out"
    p = subprocess.run(cli(*TERNARY, "--out", str(out)), capture_output=True, text=True,
                       timeout=600, cwd=out.parent)
    assert p.returncode == 0, p.stderr
    return out, p.stdout


def test_ternary_run(ternary_run):
    out, stdout = ternary_run
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("epoch 1/2") and lines[1].startswith("epoch 2/2")
    # the default BR schedule ends phase I (epoch 1 here) at lambda_final = 100
    assert float(lines[0].split("lambda ")[1].split()[0]) >= 99
    final = last_json(stdout)
    assert set(FINAL_KEYS) <= set(final)
    assert final["epoch"] == 2
    for k in ("clean_acc", "robust_acc", "fgsm_acc", "weight_sparsity", "channel_sparsity",
              "channel_sparsity_in", "test_clean_acc", "test_robust_acc", "test_fgsm_acc", "test_cw_acc"):
        assert 0.0 <= final[k] <= 1.0, k
    assert final["clean_acc"] > 0.3  # chance is 0.1; about 0.45-0.65 over seeds
    saved = json.loads((out / "metrics.json").read_text())
    assert {k: saved[k] for k in FINAL_KEYS} == {k: final[k] for k in FINAL_KEYS}
    assert saved["phase"] == 2  # epoch 2 was hard-quantized

    # the exported model holds the deployed ternary weights
    model = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert not any("parametrizations" in k for k in model)
    zeros = total = 0
    for key in QUANTIZED:
        w = model[key]
        values = torch.unique(w)
        assert len(values) <= 3, key
        assert torch.allclose(values.abs().max(), -values.min())  # {-d, 0, d}
        zeros += int((w == 0).sum())
        total += w.numel()
    for key in SHORTCUTS:  # 1x1 shortcuts stay float by default
        assert len(torch.unique(model[key])) > 3
    assert final["weight_sparsity"] == pytest.approx(zeros / total)

    # size: 2 bits per quantized weight plus one 32-bit scale per layer, 32 bits otherwise
    params = {k: v for k, v in model.items()
              if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    n = sum(v.numel() for v in params.values())
    size = sum(2 * v.numel() + 32 if k in QUANTIZED else 32 * v.numel() for k, v in params.items())
    assert final["size_bits"] == size
    assert final["compression"] == pytest.approx(32 * n / size)
    assert 1 < final["compression"] < 16


def _run_until_killed(out: Path, log: Path) -> subprocess.Popen:
    """Start the ternary run and SIGKILL it as soon as the epoch-1 checkpoint exists."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cli(*TERNARY, "--out", str(out)), stdout=f,
                                stderr=subprocess.STDOUT, cwd=out.parent)
    ck = out / "checkpoint.pt"
    deadline = time.monotonic() + 600
    while not ck.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc


def test_kill_and_resume_matches_uninterrupted_run(ternary_run, tmp_path):
    _, stdout = ternary_run
    for attempt in range(3):  # the kill races epoch 2; a lost race (epoch 2 saved) is retried
        out = tmp_path / f"try{attempt}" / "out"
        out.parent.mkdir()
        proc = _run_until_killed(out, out.parent / "log.txt")
        assert proc.returncode == -signal.SIGKILL, (out.parent / "log.txt").read_text()
        state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
        if state["epoch"] == 1:
            break
    assert state["epoch"] == 1
    assert not (out / "model.pt").exists() and not (out / "metrics.json").exists()
    assert "epoch 2/2" not in (out.parent / "log.txt").read_text()

    resumed = subprocess.run(cli("--resume", "--out", str(out)), capture_output=True, text=True,
                             timeout=600, cwd=out.parent)
    assert resumed.returncode == 0, resumed.stderr
    lines = resumed.stdout.strip().splitlines()
    assert lines[0] == "resumed after epoch 1/2"
    assert lines[1].startswith("epoch 2/2")
    timing = ("latency_ms", "latency_iqr_ms")  # wall-clock measurements, never equal twice
    got, want = ({k: v for k, v in last_json(o).items() if k not in timing} for o in (resumed.stdout, stdout))
    assert got == want
    assert (out / "model.pt").exists()


# ------------------------------------------------------------------------------------------
# bad input: exit 2, one line on stderr naming the value and what is accepted, nothing written

BAD = {
    "bits9": (["--bits", "9"], ["bits=9", "1-8", "32"]),
    "bits0": (["--bits", "0"], ["bits=0", "1-8", "32"]),
    "eps": (["--eps", "-1"], ["eps=-1", ">= 0"]),
    "attack-step": (["--attack-step", "-0.1"], ["step=-0.1", ">= 0"]),
    "dataset": (["--dataset", "nope"], ["'nope'", "digits", "cifar10", "folder:"]),
    "attack": (["--attack", "nope"], ["'nope'", "fgsm", "pgd", "cw"]),
    "loss": (["--loss", "nope"], ["'nope'", "madry", "mix", "trades"]),
    "val-fraction-0": (["--val-fraction", "0"], ["val_fraction=0", "(0, 1)", "validation"]),
    "lambda-schedule": (["--lambda-schedule", "nope"], ["lambda_schedule='nope'", "final", "rho"]),
    "attack-bn": (["--attack-bn", "nope"], ["attack_bn='nope'", "auto", "eval", "train"]),
    "lambda-final": (["--lambda-final", "0.5"], ["lambda_final=0.5", ">= lambda0"]),
    "cifar10-missing": (["--dataset", "cifar10", "--data-root", "{empty}"],
                        ["cifar10", "{empty}", "--download"]),
    # run with CXX=/bin/false (BAD_ENV): torch.compile on a CPU without a C++ compiler
    "compile-no-cxx": (["--dataset", "digits", "--device", "cpu", "--compile"],
                       ["--compile", "C++ compiler", "/bin/false"]),
}
BAD_ENV = {"compile-no-cxx": {"CXX": "/bin/false"}}
BITS3 = SMALL[:2] + ["--subset-train", "120", "--subset-test", "40", "--depth", "8", "--width", "4",
                     "--epochs", "1", "--bits", "3", "--attack-steps", "2", "--eval-steps", "2",
                     "--no-cw"]


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """All bad-input runs and the bits-3 run, started together (each is mostly interpreter
    start-up), then collected."""
    base = tmp_path_factory.mktemp("cli")
    empty = base / "empty-data-root"
    empty.mkdir()
    jobs = {}
    for name, (args, _) in {**BAD, "bits3": (BITS3, None)}.items():
        out = base / name / "out"
        args = [a.replace("{empty}", str(empty)) for a in args]
        env = {**os.environ, **BAD_ENV.get(name, {})}
        jobs[name] = (out, subprocess.Popen(cli(*args, "--out", str(out)), stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True, cwd=base, env=env))
    results = {}
    for name, (out, proc) in jobs.items():
        stdout, stderr = proc.communicate(timeout=600)
        results[name] = (proc.returncode, stdout, stderr, out)
    return results, empty


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_exits_2_with_one_line(cli_results, name):
    results, empty = cli_results
    rc, stdout, stderr, out = results[name]
    assert rc == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    if name != "cifar10-missing":
        assert "accepted" in lines[0]
    for needle in BAD[name][1]:
        assert needle.replace("{empty}", str(empty)) in lines[0]
    assert "Traceback" not in stderr
    assert stdout == ""
    assert not out.exists() and not out.parent.exists()
    assert not any(empty.iterdir())


def test_bits3_is_valid(cli_results):
    rc, stdout, stderr, out = cli_results[0]["bits3"]
    assert rc == 0, stderr
    final = last_json(stdout)
    assert final["epoch"] == 1
    model = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    zeros = total = 0
    for key in QUANTIZED:
        w = model[key]
        values = torch.unique(w)
        # 3 bits: levels -3..3 times one scale, and the grid is used (an all-zero or a binary
        # export fails here)
        assert 3 <= len(values) <= 2**3 - 1, (key, values)
        s = values.abs().max() / 3
        assert s > 0 and torch.allclose(values / s, (values / s).round(), atol=1e-4), (key, values)
        assert torch.allclose(values.max(), -values.min()), (key, values)  # symmetric
        zeros += int((w == 0).sum())
        total += w.numel()
    # the reported structure is that of the exported weights
    assert final["weight_sparsity"] == pytest.approx(zeros / total)
    assert zeros < total / 2


def test_evaluation_attack_flags_are_independent_of_training_ones():
    from trainables.train import build_parser, config_from_args

    ns = build_parser().parse_args(["--eps", "0.02", "--eval-eps", "0.05", "--eval-step", "0.01",
                                    "--attack-bn", "train", "--lambda-final", "300"])
    cfg = config_from_args(ns, None)
    assert (cfg.train_attack.eps, cfg.eval_attack.eps, cfg.eval_attack.step) == (0.02, 0.05, 0.01)
    assert cfg.train_attack.step == 0.02 / 4 and cfg.attack_bn == "train"  # unset: eps / 4
    assert cfg.quant.lambda_final == 300 and cfg.quant.lambda_schedule == "final"
