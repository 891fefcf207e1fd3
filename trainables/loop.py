"""The training loop every trial runs: adversarial Binary-Relax training of an EnResNet.

It knows nothing about Ray, MLflow or the terminal: it reports metrics and checkpoint payloads
through `Hooks`, which the CLI (`trainables.train`) and the Ray Tune adapter (`trainables.tune`)
implement. The payload is a plain dict, so resuming is the same code path everywhere.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from typing import Any, Callable

import numpy as np
import torch

from .attacks import perturb  # noqa: F401  (re-exported for callers building custom evaluations)
from .config import AttackConfig, TrainConfig
from .data import DataBundle, augment_batch, load_data
from .losses import group_penalty, group_prox_, tradeoff_loss
from .metrics import accuracy, bn_recalibrated, recalibrate_bn_, structure_metrics
from .models import Ensemble, build_model
from .quant import BinaryRelax, cached, export_state_dict, quantize_

FINAL_KEYS = ("clean_acc", "robust_acc", "fgsm_acc", "weight_sparsity", "channel_sparsity",
              "channel_sparsity_in", "size_bits", "compression", "epoch",
              "test_clean_acc", "test_robust_acc", "test_fgsm_acc")


class DivergedError(RuntimeError):
    """The loss or the weights stopped being finite: the run fails alone, with this reason."""


class Hooks:
    """Where a run's progress goes. The default keeps nothing (a plain in-process call)."""

    def load_checkpoint(self) -> dict[str, Any] | None:
        return None

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any], final: bool) -> None:
        pass


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Run:
    """A model, its BR handle, optimizer and data, ready to train or evaluate."""

    def __init__(self, cfg: TrainConfig, data: DataBundle | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        seed_everything(cfg.seed)
        self.data = data if data is not None else load_data(cfg)
        self.model: Ensemble = build_model(
            cfg.depth, cfg.width, self.data.in_channels, self.data.num_classes, cfg.ensemble, cfg.noise
        ).to(self.device)
        self.br: BinaryRelax = quantize_(self.model, cfg.quant)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
            weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0,
        )
        milestones = sorted({int(round(f * cfg.epochs)) for f in cfg.lr_milestones} - {0})
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones, 0.1)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.epoch = 0  # epochs completed
        self.bn_deployed = False  # BN statistics already re-estimated for the projected weights
        xs, ys = self.data.val.to_float(self.device)
        self.val = (xs, ys)
        k = min(cfg.proxy_eval_size, len(ys))
        self.proxy = (xs[:k], ys[:k])

    # --- checkpoint payload ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "binary_relax": self.br.state_dict(),
            "bn_deployed": self.bn_deployed,
            "generator": self.generator.get_state(),
            "rng": _rng_state(),
            "config": self.cfg.to_flat(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.br.load_state_dict(state["binary_relax"])
        self.generator.set_state(state["generator"])
        _set_rng_state(state["rng"])
        self.epoch = int(state["epoch"])
        self.bn_deployed = bool(state.get("bn_deployed", False))

    # --- training -------------------------------------------------------------------------
    def train_epoch(self) -> dict[str, float]:
        cfg, model, br = self.cfg, self.model, self.br
        train = self.data.train
        br.start_epoch(self.epoch, cfg.epochs, self.steps_per_epoch())
        model.train()
        perm = torch.randperm(len(train), generator=self.generator)
        total, batches = 0.0, 0
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            br.start_step(batches)
            x, y = train.take(idx).to_float(self.device)
            if self.data.augment:
                x = augment_batch(x, self.generator)
            total += self.train_step(x, y, batches + 1)
            batches += 1
        for p in model.parameters():
            if not torch.isfinite(p).all():
                raise DivergedError(f"weights are no longer finite after epoch {self.epoch + 1}")
        self.scheduler.step()
        self.epoch += 1
        return {"train_loss": total / max(1, batches)}

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (a last batch of one image is skipped: BatchNorm)."""
        n, b = len(self.data.train), self.cfg.batch_size
        return n // b + (1 if n % b >= 2 else 0)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int = 1) -> float:
        """One optimizer step on a prepared batch (attack, trade-off loss, group penalty or
        proximal step); returns the loss. The model's mode and the BR phase are the caller's."""
        cfg, model, br = self.cfg, self.model, self.br
        with cached():
            loss = tradeoff_loss(model, x, y, cfg.loss, cfg.train_attack, cfg.alpha, cfg.beta,
                                 cfg.attack_bn)
        if cfg.group_lasso > 0 and cfg.group_mode == "penalty":
            loss = loss + cfg.group_lasso * group_penalty(br.float_weights(), cfg.group_axis)
        if not torch.isfinite(loss):
            raise DivergedError(
                f"loss is {float(loss)} at epoch {self.epoch + 1}, step {step} "
                f"(lr={self.optimizer.param_groups[0]['lr']:g})"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        if cfg.group_lasso > 0 and cfg.group_mode == "prox":
            lr = self.optimizer.param_groups[0]["lr"]
            group_prox_(br.float_weights(), lr * cfg.group_lasso, cfg.group_axis)
        return loss.item()

    # --- evaluation -----------------------------------------------------------------------
    def _eval_rng(self):
        devices = [self.device] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    def calibration_batches(self) -> list[torch.Tensor]:
        """The first `proxy_bn_batches` training batches in a fixed order (clean images)."""
        n = min(len(self.data.train), self.cfg.proxy_bn_batches * self.cfg.batch_size)
        x, _ = self.data.train.take(torch.arange(n)).to_float(self.device)
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
                clean = accuracy(self.model, self.br, *self.val, {"clean": None})["clean"]
                rob = accuracy(self.model, self.br, *self.proxy, {"pgd": atk})["pgd"]
        return {"clean_acc": clean, "robust_acc": rob}

    def final_metrics(self) -> dict[str, float]:
        """The end-of-run evaluation. Objectives (`clean_acc`, `robust_acc`, plus `fgsm_acc`)
        on the whole validation split with the full evaluation attack; the test split once,
        under `test_` names, which nothing that selects or stops trials reads."""
        ev = self.cfg.eval_attack
        val = self.evaluate(attacks={"clean_acc": None, "robust_acc": ev,
                                     "fgsm_acc": AttackConfig("fgsm", ev.eps, ev.eps, 1, False)},
                            split="val")
        test = self.evaluate(split="test")
        return {**val, **{f"test_{k}": v for k, v in test.items()}}

    def evaluate(self, seed: int | None = None, attacks: dict[str, AttackConfig | None] | None = None,
                 split: str = "test") -> dict[str, float]:
        """The full evaluation on the fully quantized model (noise on, eval mode)."""
        cfg = self.cfg
        if attacks is None:
            ev = cfg.eval_attack
            attacks = {
                "clean_acc": None,
                "robust_acc": ev,
                "fgsm_acc": AttackConfig("fgsm", ev.eps, ev.eps, 1, False),
            }
            if cfg.cw:
                attacks["cw_acc"] = AttackConfig("cw", ev.eps, ev.step, ev.steps, ev.random_start)
        x, y = getattr(self.data, split).to_float(self.device)
        with self._eval_rng():
            torch.manual_seed(cfg.eval_seed if seed is None else seed)
            with self._deployed():
                return accuracy(self.model, self.br, x, y, attacks)

    def structure(self) -> dict[str, float]:
        return structure_metrics(self.model, self.br)

    def export(self) -> dict[str, torch.Tensor]:
        return export_state_dict(self.model, self.br)


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
            "epoch": run.epoch, "max_epochs": cfg.epochs, "lambda": run.br.lam,
            "phase": 2 if run.br.state.mode == "quantized" else 1,
            "lr": run.optimizer.param_groups[0]["lr"], "epoch_time_s": time.perf_counter() - t0,
        }
        final = run.epoch == cfg.epochs
        if final:
            run.deploy_bn()
            metrics.update(run.final_metrics())
        if log:
            log(_progress_line(metrics, cfg.epochs))
        ck = {**run.state_dict(), "metrics": metrics}
        if final:
            ck["quantized_model"] = run.export()
        hooks.report(metrics, ck, final)
    return metrics


def _progress_line(m: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {m['epoch']}/{epochs}", f"loss {m['train_loss']:.4f}",
             f"clean {m['clean_acc']:.4f}", f"robust {m['robust_acc']:.4f}",
             f"ch_sparsity {m['channel_sparsity']:.4f}", f"w_sparsity {m['weight_sparsity']:.4f}",
             f"lambda {m['lambda']:.3g}", f"{m['epoch_time_s']:.1f}s"]
    return "  ".join(parts)


def is_finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
