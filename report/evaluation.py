"""Evaluating one trained row: the seeded attacks (clean, FGSM, PGD, CW-Linf, IFGSM), the
transfer attack from the float row of the same loss, and the strong suite (AutoAttack-rand,
Square, EOT-PGD and the sanity flags of trainables.robust_eval)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from trainables.attacks import perturb
from trainables.config import AttackConfig
from trainables.contract import CLEAN_ACC
from trainables.metrics import accuracy
from trainables.robust_eval import StrongEvalConfig, strong_eval

from .grid import RowSpec, Scale, eval_attacks, is_source, transfer_source


def _fork_rng(device: torch.device):
    """Seeded evaluation without disturbing the global RNG streams."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def craft(run, x: torch.Tensor, y: torch.Tensor, atk: AttackConfig, seed: int,
          batch_size: int = 256) -> torch.Tensor:
    """White-box adversarial examples on `run`'s deployed model (eval mode, noise on, seeded)."""
    model, br = run.model, run.br
    was = model.training
    model.eval()
    out = []
    try:
        with _fork_rng(run.device), br.quantized():
            torch.manual_seed(seed)
            for i in range(0, len(x), batch_size):
                out.append(perturb(model, x[i : i + batch_size], y[i : i + batch_size], atk))
    finally:
        model.train(was)
    return torch.cat(out)


def transfer_accuracy(run, x_adv: torch.Tensor, y: torch.Tensor, seed: int) -> float:
    with _fork_rng(run.device):
        torch.manual_seed(seed)
        return accuracy(run.model, run.br, x_adv, y, {"transfer": None})["transfer"]


def evaluate_row(run, spec: RowSpec, scale: Scale, seeds: list[int], strong: StrongEvalConfig,
                 source_adv: dict[int, torch.Tensor] | None, log: Callable[[str], None],
                 ) -> tuple[dict[str, list[float]], dict[int, torch.Tensor] | None, dict[str, Any]]:
    """(per-seed accuracies in %, the row's transfer examples per seed if it is a transfer source,
    the strong suite's result). Quantized rows need their source's examples (`source_adv`)."""
    attacks = eval_attacks(scale, strong.eps)
    per_seed: dict[str, list[float]] = {k: [] for k in attacks}
    for s in seeds:
        res = run.evaluate(seed=s, attacks=attacks, split="test")
        for k, v in res.items():
            per_seed[k].append(100.0 * v)
        log(f"[{spec.id}] seed {s}: " + " ".join(f"{k} {100 * v:.1f}" for k, v in res.items()))
    x, y = run.data.test.to_float(run.device)
    adv = None
    if is_source(spec):
        pgd = attacks["pgd"]
        assert pgd is not None
        adv = {s: craft(run, x, y, pgd, s).cpu() for s in seeds}
    if spec.bits != 32:
        assert source_adv is not None
        per_seed["transfer"] = [100.0 * transfer_accuracy(run, source_adv[s].to(run.device), y, s) for s in seeds]
        log(f"[{spec.id}] transfer PGD-{scale.eval_steps} from {transfer_source(spec)}: "
            + " ".join(f"{v:.1f}" for v in per_seed["transfer"]))
    k = scale.strong_subset or len(y)
    tadv = source_adv[seeds[0]][:k] if source_adv is not None else None
    res = strong_eval(run.model, x[:k], y[:k], strong, br=run.br, transfer_adv=tadv)
    res.pop("points")
    res["suite_clean_acc"] = res[CLEAN_ACC]  # the suite's own clean score (same images, same scoring)
    log(f"[{spec.id}] strong suite on {k} images: "
        + " ".join(f"{n[:-4]} {100 * v:.1f}" for n, v in res.items() if n.endswith("_acc") and "raw" not in n)
        + f"; flags: {res['sanity_flags'] or 'none'}")
    return per_seed, adv, res
