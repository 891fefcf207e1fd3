"""The training loop every trial runs: adversarial Binary-Relax training of an EnResNet.

It knows nothing about Ray, MLflow or the terminal: it reports metrics and checkpoint payloads
through `Hooks`, which the CLI (`trainables.train`) and the Ray Tune adapter (`trainables.tune`)
implement. The payload is a plain dict, so resuming is the same code path everywhere.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from .attacks import perturb  # noqa: F401  (re-exported for callers building custom evaluations)
from .config import AttackConfig, TrainConfig
from .contract import (
    CHANNEL_SPARSITY,
    CLEAN_ACC,
    EPOCH,
    LATENCY_MS,
    LATENCY_SPREAD_MS,
    LATENCY_THREADS,
    MAX_EPOCHS,
    ROBUST_ACC,
    SIZE_KIB,
)
from .data import DataBundle, EpochPlan, Split, as_float, load_data
from .device import (  # noqa: F401
    autocast,
    check_device,
    check_precision,
    pick_device,
    rng_state,
    seed_everything,
    set_deterministic,
    set_rng_state,
)
from .footprint import footprint
from .losses import group_penalty, group_prox_, tradeoff_loss
from .metrics import accuracy, bn_recalibrated, recalibrate_bn_, structure_metrics
from .models import Ensemble, build_model
from .quant import BinaryRelax, cached, export_state_dict, quantize_

# the loop reads the device once per this many steps (and at the epoch's end) to stop a run whose
# loss went non-finite; every other step runs without a host sync
FINITE_CHECK_EVERY = 16

FINAL_KEYS = (CLEAN_ACC, ROBUST_ACC, "fgsm_acc", "weight_sparsity", CHANNEL_SPARSITY,
              "channel_sparsity_in", "size_bits", "compression", SIZE_KIB, EPOCH,
              "test_clean_acc", "test_robust_acc", "test_fgsm_acc")
# reported only where onnxruntime is installed and cfg.latency asks for it
LATENCY_KEYS = (LATENCY_MS, LATENCY_SPREAD_MS, LATENCY_THREADS)


class DivergedError(RuntimeError):
    """The loss or the weights stopped being finite: the run fails alone, with this reason."""


class Hooks:
    """Where a run's progress goes. The default keeps nothing (a plain in-process call)."""

    def load_checkpoint(self) -> dict[str, Any] | None:
        return None

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any], final: bool) -> None:
        pass


class Run:
    """A model, its BR handle, optimizer and data, ready to train or evaluate."""

    def __init__(self, cfg: TrainConfig, data: DataBundle | None = None,
                 device: torch.device | None = None) -> None:
        """`device` overrides cfg.device unchecked: the tests' stand-in device (`meta`)."""
        cfg.validate()
        self.cfg = cfg
        if device is None:
            check_device(cfg.device)
            device = pick_device(cfg.device)
        self.device = device
        check_precision(cfg.precision, device)
        set_deterministic(cfg.deterministic, device)
        seed_everything(cfg.seed)
        self.data = data if data is not None else load_data(cfg)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        # built (and initialised, from the CPU generator) on the host: the same weights on any device
        self.model: Ensemble = build_model(
            cfg.depth, cfg.width, self.data.in_channels, self.data.num_classes, cfg.ensemble, cfg.noise
        ).to(self.device, memory_format=self.memory_format)
        self.br: BinaryRelax = quantize_(self.model, cfg.quant)
        # what the passes call; the state (checkpoints, export) stays with self.model
        if cfg.compile:
            from .quant import exclude_from_compile

            exclude_from_compile()
        self.net: torch.nn.Module = torch.compile(self.model) if cfg.compile else self.model
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
            weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0,
        )
        # fp16 needs loss scaling (bf16 and fp32 do not); its inf check reads the device each step
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        milestones = sorted({int(round(f * cfg.epochs)) for f in cfg.lr_milestones} - {0})
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones, 0.1)
        # data order and augmentation: a CPU generator, so they do not depend on the device
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.epoch = 0  # epochs completed
        self.bn_deployed = False  # BN statistics already re-estimated for the projected weights
        self._splits: dict[str, Split] = {"train": self.data.train.to(self.device)}  # uint8, once
        xs, ys = self.split("val")
        self.val = (as_float(xs), ys)
        k = min(cfg.proxy_eval_size, len(ys))
        self.proxy = (self.val[0][:k], ys[:k])

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A split's images (uint8 where the data set is) and labels on the device, copied there
        once per run rather than on every evaluation."""
        if name not in self._splits:
            self._splits[name] = getattr(self.data, name).to(self.device)
        s = self._splits[name]
        return s.x, s.y

    # --- checkpoint payload ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {
            EPOCH: self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "binary_relax": self.br.state_dict(),
            "bn_deployed": self.bn_deployed,
            "generator": self.generator.get_state(),
            "rng": rng_state(self.device),
            "config": self.cfg.to_flat(),
        }
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.br.load_state_dict(state["binary_relax"])
        self.generator.set_state(state["generator"])
        set_rng_state(state["rng"], self.device)
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.epoch = int(state[EPOCH])
        self.bn_deployed = bool(state.get("bn_deployed", False))

    # --- training -------------------------------------------------------------------------
    def train_epoch(self) -> dict[str, float]:
        """One epoch. The steps never wait for the device: the loss is summed there and read
        every FINITE_CHECK_EVERY steps (a non-finite loss stops the run within that many steps)
        and once at the end, with the weights' finiteness."""
        cfg, model, br = self.cfg, self.model, self.br
        train = self._splits["train"]
        br.start_epoch(self.epoch, cfg.epochs, self.steps_per_epoch())
        model.train()
        plan = EpochPlan.draw(len(train), cfg.batch_size, self.generator, self.data.augment, self.device)
        total = torch.zeros((), device=self.device)
        checked = 0
        slices = plan.slices()
        for b, s in enumerate(slices):
            br.start_step(b)
            x, y = plan.batch(train, s, self.memory_format)
            total += self._step(x, y)
            if (b + 1) % FINITE_CHECK_EVERY == 0:
                self._check_loss(float(total), checked + 1, b + 1)
                checked = b + 1
        finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
        loss_sum, weights_ok = torch.stack([total, finite.to(total.dtype)]).tolist()  # one read
        self._check_loss(loss_sum, checked + 1, len(slices))
        if not weights_ok:
            raise DivergedError(f"weights are no longer finite after epoch {self.epoch + 1}")
        self.scheduler.step()
        self.epoch += 1
        return {"train_loss": loss_sum / max(1, len(slices))}

    def _check_loss(self, loss_sum: float, first: int, last: int) -> None:
        if not math.isfinite(loss_sum):
            steps = f"step {last}" if first >= last else f"steps {first}-{last}"
            raise DivergedError(
                f"loss is {loss_sum} at epoch {self.epoch + 1}, {steps} "
                f"(lr={self.optimizer.param_groups[0]['lr']:g})"
            )

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (a last batch of one image is skipped: BatchNorm)."""
        n, b = len(self.data.train), self.cfg.batch_size
        return n // b + (1 if n % b >= 2 else 0)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int = 1) -> float:
        """One optimizer step on a prepared batch (attack, trade-off loss, group penalty or
        proximal step); returns the loss, which reads the device (train_epoch does not)."""
        loss = float(self._step(x, y))
        self._check_loss(loss, step, step)
        return loss

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The step itself, without reading the device; returns the detached fp32 loss. The
        model's mode and the BR phase are the caller's.

        Precision: autocast covers the model's forward passes (attack steps included); the BR
        projections (quant.py) run with autocast off, the loss is taken to fp32 before the group
        penalty (fp32, on the float weights) is added, and the attacks' iterates, steps and
        projections onto the eps-ball are fp32 tensors throughout."""
        cfg, br = self.cfg, self.br
        with cached(), autocast(self.device, cfg.precision):
            loss = tradeoff_loss(self.net, x, y, cfg.loss, cfg.train_attack, cfg.alpha, cfg.beta,
                                 cfg.attack_bn)
        loss = loss.float()
        if cfg.group_lasso > 0 and cfg.group_mode == "penalty":
            loss = loss + cfg.group_lasso * group_penalty(br.float_weights(), cfg.group_axis)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            if cfg.max_grad_norm:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if cfg.group_lasso > 0 and cfg.group_mode == "prox":
            lr = self.optimizer.param_groups[0]["lr"]
            group_prox_(br.float_weights(), lr * cfg.group_lasso, cfg.group_axis)
        return loss.detach()

    # --- evaluation -----------------------------------------------------------------------
    def _eval_rng(self):
        devices = [self.device] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    def calibration_batches(self) -> list[torch.Tensor]:
        """The first `proxy_bn_batches` training batches in a fixed order (clean images)."""
        n = min(len(self.data.train), self.cfg.proxy_bn_batches * self.cfg.batch_size)
        x = as_float(self._splits["train"].x[:n]).contiguous(memory_format=self.memory_format)
        return [x[i : i + self.cfg.batch_size] for i in range(0, n, self.cfg.batch_size)
                if len(x[i : i + self.cfg.batch_size]) >= 2]

    def needs_bn_calibration(self) -> bool:
        """In phase I the running BN statistics were gathered under the relaxed weights, so they
        do not match the projected weights that every evaluation uses; in phase II they do."""
        return (self.br.enabled and self.br.state.mode == "relaxed" and self.cfg.proxy_bn_batches > 0
                and not self.bn_deployed)

    def deploy_bn(self) -> None:
        """A run that ends in phase I (phase2_start = 1) keeps BN statistics re-estimated under
        the projected weights, so the exported model is the one the objectives measured. After
        phase II nothing changes: its statistics were gathered under the projected weights."""
        if self.needs_bn_calibration():
            with self._eval_rng():
                torch.manual_seed(self.cfg.eval_seed)
                recalibrate_bn_(self.model, self.br, self.calibration_batches())
            self.bn_deployed = True

    def _deployed(self):
        """The model as deployed: projected weights, and (in phase I) BN statistics re-estimated
        under them on a few training batches; the training buffers come back afterwards."""
        if not self.needs_bn_calibration():
            return contextlib.nullcontext()
        return bn_recalibrated(self.model, self.br, self.calibration_batches())

    def proxy_metrics(self) -> dict[str, float]:
        """Cheap per-epoch objectives on the validation split: clean accuracy on all of it and a
        few-step PGD on a fixed subset, on the deployed model (see `_deployed`). Seeded, and
        isolated from the training RNG stream."""
        cfg = self.cfg
        k = cfg.proxy_attack_steps  # step 2.5*eps/k, the usual choice for a k-step PGD
        atk = AttackConfig("pgd", cfg.eval_attack.eps, 2.5 * cfg.eval_attack.eps / k, k, True)
        with self._eval_rng():
            torch.manual_seed(cfg.eval_seed)
            with self._deployed():
                clean = self._accuracy(*self.val, {"clean": None}, draws=1)["clean"]
                rob = self._accuracy(*self.proxy, {"pgd": atk}, draws=1)["pgd"]
        return {CLEAN_ACC: clean, ROBUST_ACC: rob}

    def final_metrics(self) -> dict[str, float]:
        """The end-of-run evaluation. Objectives (`clean_acc`, `robust_acc`, plus `fgsm_acc`)
        on the whole validation split with the full evaluation attack; the test split once,
        under `test_` names, which nothing that selects or stops trials reads."""
        ev = self.cfg.eval_attack
        val = self.evaluate(attacks={CLEAN_ACC: None, ROBUST_ACC: ev,
                                     "fgsm_acc": AttackConfig("fgsm", ev.eps, ev.eps, 1, False)},
                            split="val")
        test = self.evaluate(split="test")
        return {**val, **{f"test_{k}": v for k, v in test.items()}}

    def _accuracy(self, x: torch.Tensor, y: torch.Tensor, attacks: dict[str, AttackConfig | None],
                  draws: int | None = None) -> dict[str, float]:
        return accuracy(self.net, self.br, x, y, attacks, self.cfg.eval_batch_size,
                        precision=(self.device, self.cfg.precision), memory_format=self.memory_format,
                        draws=self.cfg.eval_draws if draws is None else draws)

    def evaluate(self, seed: int | None = None, attacks: dict[str, AttackConfig | None] | None = None,
                 split: str = "test") -> dict[str, float]:
        """The full evaluation on the fully quantized model (noise on, eval mode)."""
        cfg = self.cfg
        if attacks is None:
            ev = cfg.eval_attack
            attacks = {
                CLEAN_ACC: None,
                ROBUST_ACC: ev,
                "fgsm_acc": AttackConfig("fgsm", ev.eps, ev.eps, 1, False),
            }
            if cfg.cw:
                attacks["cw_acc"] = AttackConfig("cw", ev.eps, ev.step, ev.steps, ev.random_start)
        x, y = self.split(split)
        with self._eval_rng():
            torch.manual_seed(cfg.eval_seed if seed is None else seed)
            with self._deployed():
                return self._accuracy(x, y, attacks)

    def structure(self) -> dict[str, float]:
        return structure_metrics(self.model, self.br)

    def export(self) -> dict[str, torch.Tensor]:
        return export_state_dict(self.model, self.br)

    def footprint(self, final: bool) -> dict[str, Any]:
        """size_kib of the model as it would ship now, and (per cfg.latency, where onnxruntime is
        installed) its onnxruntime latency: trainables.footprint."""
        from .onnx_export import available

        mode = self.cfg.latency
        timed = (mode == "every" or (mode == "end" and final)) and available() is None
        return footprint(self.export(), self.cfg, self.val[0][:1], timed)


def train(cfg: TrainConfig, hooks: Hooks | None = None, log: Callable[[str], None] | None = None,
          data: DataBundle | None = None) -> dict[str, Any]:
    """Train per cfg (resuming from hooks.load_checkpoint()), report every epoch, and return the
    final metrics of the fully quantized model: objectives on the validation split, `test_*`
    from the one evaluation of the test split."""
    hooks = hooks or Hooks()
    run = Run(cfg, data)
    state = hooks.load_checkpoint()
    if state is not None:
        run.load_state_dict(state)
        if log:
            log(f"resumed after epoch {run.epoch}/{cfg.epochs}")
    metrics: dict[str, Any] = dict(state.get("metrics", {})) if state else {}
    while run.epoch < cfg.epochs:
        t0 = time.perf_counter()
        stats = run.train_epoch()
        proxy = run.proxy_metrics()
        metrics = {
            **stats, **proxy, **run.structure(),
            EPOCH: run.epoch, MAX_EPOCHS: cfg.epochs, "lambda": run.br.lam,
            "phase": 2 if run.br.state.mode == "quantized" else 1,
            "lr": run.optimizer.param_groups[0]["lr"], "epoch_time_s": time.perf_counter() - t0,
        }
        final = run.epoch == cfg.epochs
        if final:
            run.deploy_bn()
            metrics.update(run.final_metrics())
        metrics.update(run.footprint(final))
        if log:
            log(_progress_line(metrics, cfg.epochs))
        ck = {**run.state_dict(), "metrics": metrics}
        if final:
            ck["quantized_model"] = run.export()
        hooks.report(metrics, ck, final)
    return metrics


def _progress_line(m: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {m[EPOCH]}/{epochs}", f"loss {m['train_loss']:.4f}",
             f"clean {m[CLEAN_ACC]:.4f}", f"robust {m[ROBUST_ACC]:.4f}",
             f"ch_sparsity {m[CHANNEL_SPARSITY]:.4f}", f"w_sparsity {m['weight_sparsity']:.4f}",
             f"lambda {m['lambda']:.3g}", f"{m['epoch_time_s']:.1f}s"]
    return "  ".join(parts)


def is_finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
