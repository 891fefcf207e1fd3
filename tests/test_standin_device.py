"""A training run on a stand-in device, on a CPU-only machine: `meta` tensors in place of CUDA.

Meta tensors have shapes, dtypes and a device but no data, and PyTorch refuses to mix them with
CPU tensors (apart from 0-dim scalars, as CUDA does), so a training step, an evaluation, a
checkpoint round trip and the export run on `meta` fail at the first tensor left on the host. A
dispatch mode on top (`DeviceWatch`) is stricter than CUDA and also counts what makes the host
wait for the device:

* any op mixing devices fails, including indexing a device tensor with host indices (which CUDA
  allows at the price of a hidden copy every step);
* host syncs are counted: scalar reads (`.item()`, `bool()`, `float()`, `int()`, `.tolist()`),
  data-dependent shapes (nonzero, masked_select, unique), copies from the device to the host;
  a read on meta returns a stand-in (True / 1, a copy of ones), so the code runs on;
* host-to-device copies are counted too.

Budgets: a training step (`Run._step` and the epoch loop's batch preparation) makes no host sync
and no host-to-device copy; an epoch makes at most one read per FINITE_CHECK_EVERY steps plus
one, and three copies to the device (the epoch's order and augmentation draws); an evaluation
reads once per accuracy call. One planted mismatch and one planted `.item()` prove the watch
can fail.
"""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from trainables.config import TrainConfig
from trainables.data import DataBundle, Split
from trainables.loop import FINITE_CHECK_EVERY, Run

aten = torch.ops.aten
STANDIN = torch.device("meta")
SCALAR_READS = {aten._local_scalar_dense.default}
DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
                  aten.unique_dim.default, aten.unique_consecutive.default}
COPIES = {aten._to_copy.default, aten.copy_.default}


class DeviceMismatch(AssertionError):
    pass


class DeviceWatch(TorchDispatchMode):
    """Fails on mixed devices; counts host syncs and host-to-device copies (see module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs = 0
        self.h2d = 0
        self.sync_ops: list[str] = []

    def snapshot(self) -> tuple[int, int]:
        return self.syncs, self.h2d

    def _sync(self, func) -> None:
        self.syncs += 1
        self.sync_ops.append(str(func))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func in SCALAR_READS:
            self._sync(func)
            t = args[0]
            if t.device.type == "meta":  # no value to read: a stand-in that keeps the code going
                return True if t.dtype == torch.bool else (1.0 if t.is_floating_point() else 1)
            return func(*args, **kwargs)
        if func in COPIES:
            if func is aten._to_copy.default:
                src, dst = args[0].device, kwargs.get("device") or args[0].device
            else:
                dst, src = args[0].device, args[1].device
            if src.type == "cpu" and dst.type == "meta" and args[0].dim() > 0:
                self.h2d += 1
            if src.type == "meta" and dst.type == "cpu":
                self._sync(func)
                if func is aten._to_copy.default:  # the host copy of data that does not exist:
                    # ones (finite losses, "all finite" flags) keep the code going
                    return torch.ones(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
                return args[0]
            return func(*args, **kwargs)
        devices = {t.device for t in tensors if t.dim() > 0 or t.device.type != "cpu"}
        if len(devices) > 1:
            raise DeviceMismatch(f"{func} mixes {sorted(map(str, devices))}")
        if func in DATA_DEPENDENT:
            self._sync(func)
        return func(*args, **kwargs)


def small_cifar(n: int = 20) -> DataBundle:
    """CIFAR-shaped uint8 images (augmented: crop + flip), on the host as load_data leaves them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataBundle("synthetic", Split(x[:16], y[:16]), Split(x[16:], y[16:]), Split(x[16:], y[16:]),
                      10, augment=True)


def standin_cfg(**over) -> TrainConfig:
    cfg = TrainConfig(dataset="digits", depth=8, width=4, ensemble=2, batch_size=4, epochs=4,
                      loss="mix", group_lasso=1e-4, proxy_eval_size=4, eval_batch_size=4, cw=True)
    cfg.quant.bits = 4
    cfg.quant.lloyd_iters = 3
    cfg.train_attack.steps = 2
    cfg.eval_attack.steps = 2
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def run_on_standin(cfg: TrainConfig, watch: DeviceWatch, epoch_only: bool = False) -> dict:
    """Build, train one epoch, evaluate, checkpoint (and load it into a fresh run), export, all
    on the stand-in device under `watch`; returns what was counted where. `epoch_only` stops
    after the training epoch (the planted faults are in it; saves ~35 % of the CPU time)."""
    data = small_cifar()
    counts = {}
    with watch:
        run = Run(cfg, data, device=STANDIN)
        assert all(p.device == STANDIN for p in run.model.parameters())
        steps = []
        inner = run._step

        def counted_step(x, y):
            before = watch.snapshot()
            assert x.device == STANDIN and y.device == STANDIN
            out = inner(x, y)
            steps.append(tuple(a - b for a, b in zip(watch.snapshot(), before)))
            return out

        run._step = counted_step
        s0 = watch.snapshot()
        run.train_epoch()
        counts["epoch"] = tuple(a - b for a, b in zip(watch.snapshot(), s0))
        counts["steps"] = steps
        if epoch_only:
            return counts
        s0 = watch.snapshot()
        proxy = run.proxy_metrics()
        final = run.evaluate()
        counts["eval"] = tuple(a - b for a, b in zip(watch.snapshot(), s0))
        counts["metrics"] = {**proxy, **final}
        ck = run.state_dict()
        buf = io.BytesIO()
        torch.save(ck, buf)
        buf.seek(0)
        again = Run(cfg, data, device=STANDIN)
        again.load_state_dict(torch.load(buf, weights_only=False))
        counts["checkpoint"] = ck
        counts["export"] = run.export()
    return counts


def _tensors(obj) -> list[torch.Tensor]:
    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]


@pytest.mark.slow  # end to end (subprocess or training); docs/testing.md
@pytest.mark.parametrize("over", [{}, {"channels_last": True, "loss": "trades", "group_mode": "prox"}],
                         ids=["mix-penalty", "trades-prox-channels-last"])
def test_standin_run_has_no_mismatch_and_keeps_the_sync_budget(over):
    watch = DeviceWatch()
    c = run_on_standin(standin_cfg(**over), watch)
    steps = c["steps"]
    assert len(steps) == 4  # 16 images, batch 4
    # a training step: no host sync, no host-to-device copy
    assert all(s == (0, 0) for s in steps), (steps, watch.sync_ops)
    # the epoch: a loss read every FINITE_CHECK_EVERY steps and one at the end; the epoch's
    # order and crop/flip draws copied to the device once
    syncs, h2d = c["epoch"]
    assert syncs <= len(steps) // FINITE_CHECK_EVERY + 1, watch.sync_ops
    assert h2d <= 3
    # evaluation: one read per accuracy call (proxy clean, proxy PGD, the final four attacks);
    # the test split's images and labels go to the device once per run
    assert c["eval"][0] <= 3 and c["eval"][1] <= 2, watch.sync_ops
    assert set(c["metrics"]) >= {"clean_acc", "robust_acc", "fgsm_acc", "cw_acc"}
    # the checkpoint: model and optimizer state on the training device, generator and RNG
    # states on the host (what a CPU-only driver loads with map_location="cpu"); no GPU state
    ck = c["checkpoint"]
    assert {t.device for t in _tensors(ck["model"]) + _tensors(ck["optimizer"])} == {STANDIN}
    assert ck["generator"].device.type == "cpu" and ck["rng"]["torch"].device.type == "cpu"
    assert "device" not in ck["rng"] and "cuda" not in ck["rng"]
    # the export: host tensors only
    assert c["export"] and {t.device.type for t in c["export"].values()} == {"cpu"}


def test_a_planted_device_mismatch_fails():
    """The augmentation offsets left on the host (the draw not moved to the device)."""
    import trainables.data as data_mod

    real = data_mod.EpochPlan.draw.__func__

    def draw_on_host(cls, n, batch_size, generator, augment, device, pad=4):
        return real(cls, n, batch_size, generator, augment, "cpu", pad)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data_mod.EpochPlan, "draw", classmethod(draw_on_host))
        with pytest.raises(DeviceMismatch, match="meta"):
            run_on_standin(standin_cfg(), DeviceWatch(), epoch_only=True)


def test_a_planted_host_sync_breaks_the_step_budget():
    """A `.item()` per step (what the loop did before) is counted and breaks the budget."""
    import trainables.loop as loop_mod

    real = loop_mod.Run._step

    def step_with_item(self, x, y):
        loss = real(self, x, y)
        if not math.isfinite(loss.item()):
            raise AssertionError("unreachable on meta: the stand-in value is 1")
        return loss

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop_mod.Run, "_step", step_with_item)
        c = run_on_standin(standin_cfg(), DeviceWatch(), epoch_only=True)
    assert len(c["steps"]) == 4 and all(s[0] == 1 for s in c["steps"]), c["steps"]
