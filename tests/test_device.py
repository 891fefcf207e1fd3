"""The training device: --device checks, device-only RNG state, the trial's GPU
mapping, and the on-device data pipeline (uint8 images, batched crop + flip, one copy per epoch).

The stand-in device run (a training step, evaluation, checkpoint and export on `meta`, with a
host-sync budget) is in tests/test_standin_device.py.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from trainables.config import ConfigError
from trainables.data import EpochPlan, Split, augment_batch, crop_flip
from trainables.device import check_device, rng_state, set_rng_state

# --- --device -------------------------------------------------------------------------------

def test_check_device_accepts_and_refuses():
    for ok in ("auto", "cpu"):
        check_device(ok, cuda_count=0)
    check_device("cuda", cuda_count=1)
    check_device("cuda:1", cuda_count=2)
    with pytest.raises(ConfigError, match=r"device='cuda' but this machine has no usable CUDA device; accepted: auto or cpu"):
        check_device("cuda", cuda_count=0)
    with pytest.raises(ConfigError, match=r"device='cuda:7' but only 2 CUDA device\(s\) are visible; accepted: cuda:0 to cuda:1"):
        check_device("cuda:7", cuda_count=2)
    with pytest.raises(ConfigError, match=r"device='gpu'; accepted: auto, cpu, cuda, cuda:N"):
        check_device("gpu", cuda_count=2)
    with pytest.raises(ConfigError, match="accepted"):
        check_device("cuda:x", cuda_count=2)


def _cli_cases() -> dict[str, list[str]]:
    cases = {"cuda-out-of-range": ["--device", "cuda:99"], "not-a-device": ["--device", "tpu"]}
    if not torch.cuda.is_available():
        cases["cuda-without-cuda"] = ["--device", "cuda"]
    return cases


@pytest.mark.slow  # end to end (subprocess or training); docs/testing.md
def test_cli_refuses_unusable_device_with_one_line_and_writes_nothing(tmp_path):
    procs = {}
    for name, args in _cli_cases().items():
        out = tmp_path / name / "out"
        procs[name] = (out, subprocess.Popen(
            [sys.executable, "-m", "trainables.train", *args, "--epochs", "1", "--out", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path))
    for name, (out, p) in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        lines = stderr.strip().splitlines()
        assert p.returncode == 2, (name, stderr)
        assert len(lines) == 1 and lines[0].startswith("error: device="), (name, stderr)
        assert "accepted" in lines[0] and "Traceback" not in stderr and stdout == ""
        assert not out.parent.exists(), name


# --- RNG state --------------------------------------------------------------------------------

def test_cpu_run_saves_and_needs_no_gpu_rng_state():
    state = rng_state(torch.device("cpu"))
    assert set(state) == {"torch", "numpy", "python"}  # no GPU generator, whatever is visible
    # a checkpoint of an older version with eight GPUs' states resumes on a CPU without error
    old = dict(state, cuda=[torch.zeros(16, dtype=torch.uint8)] * 8)
    torch.manual_seed(5)
    a = torch.rand(3)
    set_rng_state(old, torch.device("cpu"))
    set_rng_state(state, torch.device("cpu"))
    torch.manual_seed(5)
    assert torch.equal(a, torch.rand(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_saves_its_own_device_state_only():
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    state = rng_state(dev)
    assert state["device"]["type"] == "cuda" and isinstance(state["device"]["state"], torch.Tensor)
    x = torch.rand(4, device=dev)
    set_rng_state(state, dev)
    assert torch.equal(x, torch.rand(4, device=dev))


# --- the trial's GPU ------------------------------------------------------------------------------

def test_trial_device_maps_to_the_gpus_ray_assigned(monkeypatch):
    from trainables.tune import trial_device

    monkeypatch.delenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", raising=False)
    assert trial_device("cpu", ["3"]) == "cpu"
    assert trial_device("auto", []) == "cpu"
    # Ray sets CUDA_VISIBLE_DEVICES to the trial's own GPUs: its first is cuda:0
    assert trial_device("cuda", ["3"]) == "cuda:0"
    assert trial_device("cuda:1", ["3", "5"]) == "cuda:1"
    with pytest.raises(ConfigError, match="no GPU"):
        trial_device("cuda", [])
    with pytest.raises(ConfigError, match=r"given 1 GPU\(s\); accepted: cuda or cuda:0 to cuda:0"):
        trial_device("cuda:1", ["3"])
    monkeypatch.setenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "1")  # all GPUs visible
    assert trial_device("cuda:1", ["3", "5"]) == "cuda:5"


# --- data on the device ---------------------------------------------------------------------------

def _reference_crop_flip(x: torch.Tensor, dy: int, dx: int, flip: bool, pad: int = 4) -> torch.Tensor:
    """One image, the obvious way."""
    h, w = x.shape[-2:]
    p = torch.zeros(x.shape[0], h + 2 * pad, w + 2 * pad, dtype=x.dtype)
    p[:, pad:pad + h, pad:pad + w] = x
    out = p[:, dy:dy + h, dx:dx + w]
    return out.flip(-1) if flip else out


def test_crop_flip_matches_per_image_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=g)
    shifts = torch.randint(0, 9, (2, 16), generator=g)
    flips = torch.rand(16, generator=g) < 0.5
    assert flips.any() and not flips.all()
    got = crop_flip(x, shifts, flips)
    for i in range(16):
        ref = _reference_crop_flip(x[i], int(shifts[0, i]), int(shifts[1, i]), bool(flips[i]))
        assert torch.equal(got[i], ref), i
    # uint8 crop then float == float crop (what the loop relies on)
    assert torch.equal(crop_flip(x.float() / 255, shifts, flips), got.float() / 255)
    assert augment_batch(x.float(), torch.Generator().manual_seed(0)).is_contiguous()


def test_epoch_plan_visits_every_image_once_and_augments_per_plan():
    n, b = 49, 16
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(n)
    split = Split(x, y)
    plan = EpochPlan.draw(n, b, torch.Generator().manual_seed(0), True, "cpu")
    slices = plan.slices()
    assert [s.stop - s.start for s in slices] == [16, 16, 16]  # the 1-image tail is skipped
    seen = torch.cat([plan.batch(split, s)[1] for s in slices] + [plan.order[48:]])
    assert sorted(seen.tolist()) == list(range(n))
    for s in slices:
        xb, yb = plan.batch(split, s)
        assert xb.dtype == torch.float32 and xb.is_contiguous() and 0 <= xb.min() and xb.max() <= 1
        for j, i in enumerate(yb.tolist()):
            k = s.start + j
            ref = _reference_crop_flip(x[i], int(plan.shifts[0, k]), int(plan.shifts[1, k]), bool(plan.flips[k]))
            assert torch.equal(xb[j], ref.float() / 255)
    xb, _ = plan.batch(split, slices[0], torch.channels_last)
    assert xb.is_contiguous(memory_format=torch.channels_last)
    # the same generator state draws the same epoch (what an exact resume needs)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator()
    g2.set_state(g1.get_state())
    p1, p2 = EpochPlan.draw(n, b, g1, True, "cpu"), EpochPlan.draw(n, b, g2, True, "cpu")
    assert torch.equal(p1.order, p2.order) and torch.equal(p1.shifts, p2.shifts) and torch.equal(p1.flips, p2.flips)
    assert EpochPlan.draw(n, b, torch.Generator(), False, "cpu").shifts is None
