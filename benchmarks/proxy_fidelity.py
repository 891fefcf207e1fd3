"""How well do the per-epoch proxies predict a trial's final objectives?

Random configurations of the paper space (`spaces/paper.py`) are trained for `--epochs` epochs on
digits (or the CIFAR-10 subset). After every epoch the proxies are computed twice on the same
model, side by side: `before` evaluates the projected weights with the training BatchNorm
statistics (`proxy_bn_batches=0`), `after` re-estimates the
BN statistics under the projected weights first (the default). Training is the same either way
(the proxies run on a forked RNG and restore the BN buffers), so one run gives both.

Reported per epoch e < E, over the configurations: the Spearman correlation between the proxy at
epoch e and the final objective, for clean accuracy, robust accuracy and the hypervolume box
(clean+0.1)(robust+0.1)(sparsity+0.1) that docs/benchmarks.md used for the "before" figures;
and the largest |proxy clean - final clean| from epoch 2 on. It also checks that the final model
needs no recalibration: the final validation accuracies with and without re-estimated BN.

    nice -n 10 python benchmarks/proxy_fidelity.py --configs 16 --epochs 6
    nice -n 10 python benchmarks/proxy_fidelity.py --dataset cifar10 --configs 8 --epochs 4

The last stdout line is a JSON object with the figures.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time

import torch
from scipy.stats import spearmanr

from spaces.paper import SPACE
from trainables.config import TrainConfig
from trainables.data import load_data
from trainables.loop import Run
from trainables.metrics import accuracy, bn_recalibrated


def sample(rng: random.Random) -> dict:
    """One random configuration of a search-space dict (uniform / log-uniform / categorical,
    `when` conditions, `allow_zero` as a fair coin, values under `zero_below` trained as 0, as
    the sweep's trainable does)."""
    out: dict = {}
    params = SPACE["params"]
    for name, p in params.items():
        if p["type"] == "categorical":
            out[name] = rng.choice(p["choices"])
    for name, p in params.items():
        if p["type"] == "categorical":
            continue
        if any(out.get(k) != v for k, v in p.get("when", {}).items()):
            continue
        if p.get("allow_zero") and rng.random() < 0.5:
            out[name] = 0.0
            continue
        lo, hi = p["low"], p["high"]
        out[name] = math.exp(rng.uniform(math.log(lo), math.log(hi))) if p.get("log") else rng.uniform(lo, hi)
        if out[name] < p.get("zero_below", float("-inf")):
            out[name] = 0.0
    return {**SPACE.get("fixed", {}), **out}


def box(m: dict) -> float:
    return (m["clean_acc"] + 0.1) * (m["robust_acc"] + 0.1) * (m["channel_sparsity"] + 0.1)


def one_config(base: dict, params: dict, data, epochs: int) -> dict:
    cfg = TrainConfig.from_flat({**base, **params, "epochs": epochs})
    run = Run(cfg, data)
    calibration = cfg.proxy_bn_batches
    per_epoch = []
    while run.epoch < epochs:
        run.train_epoch()
        s = run.structure()
        run.cfg.proxy_bn_batches = 0
        before = {**run.proxy_metrics(), **s}
        run.cfg.proxy_bn_batches = calibration
        after = {**run.proxy_metrics(), **s}
        per_epoch.append({"before": before, "after": after, "phase": run.br.state.mode})
    final = {**run.final_metrics(), **run.structure()}
    # does the final (phase II) model need recalibration? same evaluation with re-estimated BN
    x, y = run.val
    with run._eval_rng():
        torch.manual_seed(cfg.eval_seed)
        plain = accuracy(run.model, run.br, x, y, {"c": None})["c"]
        with bn_recalibrated(run.model, run.br, run.calibration_batches()):
            recal = accuracy(run.model, run.br, x, y, {"c": None})["c"]
    return {"params": params, "per_epoch": per_epoch, "final": final,
            "final_clean_plain": plain, "final_clean_recalibrated": recal}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-root", default="./data")
    ap.add_argument("--configs", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subset-train", type=int, default=None,
                    help="training images drawn (default: 600 for digits, 1000 otherwise)")
    ap.add_argument("--width", type=int, default=None, help="base width (default: 4 for digits, 8 otherwise)")
    ap.add_argument("--out", default=None, help="also write every record as JSON here")
    ap.add_argument("--runs", default=None,
                    help='JSON list of configurations to run instead of random ones, on the default '
                         'TrainConfig (whole dataset, width 16), e.g. \'[{"bits": 1, "loss": "mix"}]\'')
    args = ap.parse_args()
    if args.dataset == "digits":
        base = dict(dataset="digits", subset_train=600, subset_test=200, depth=8, width=4)
    else:
        base = dict(dataset=args.dataset, data_root=args.data_root, subset_train=1000, subset_test=300,
                    depth=8, width=8)
    for k in ("subset_train", "width"):
        if getattr(args, k) is not None:
            base[k] = getattr(args, k)
    base.update(attack_steps=2, attack_step=4 / 255, cw=False, proxy_eval_size=64)
    fixed_runs = json.loads(args.runs) if args.runs else None
    if fixed_runs:
        base = dict(dataset=args.dataset, data_root=args.data_root, cw=False)
        args.configs = len(fixed_runs)
    data = load_data(TrainConfig.from_flat({**base, "epochs": 1}))
    rng = random.Random(args.seed)
    records = []
    t0 = time.time()
    for i in range(args.configs):
        params = fixed_runs[i] if fixed_runs else {**sample(rng), "seed": i}
        rec = one_config(base, params, data, args.epochs)
        records.append(rec)
        f = rec["final"]
        print(f"config {i + 1}/{args.configs} {params}: final clean "
              f"{f['clean_acc']:.3f} robust {f['robust_acc']:.3f}; per-epoch clean before "
              + " ".join(f"{e['before']['clean_acc']:.2f}" for e in rec["per_epoch"]) + " after "
              + " ".join(f"{e['after']['clean_acc']:.2f}" for e in rec["per_epoch"])
              + f"  ({time.time() - t0:.0f}s)", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(records, fh)
    summary: dict = {"dataset": args.dataset, "configs": args.configs, "epochs": args.epochs}
    for which in ("before", "after"):
        rows = {}
        for e in range(args.epochs - 1):
            r = {}
            for name, get in (("clean", lambda m: m["clean_acc"]), ("robust", lambda m: m["robust_acc"]),
                              ("box", box)):
                proxy = [get(rec["per_epoch"][e][which]) for rec in records]
                final = [get(rec["final"]) for rec in records]
                rho = float(spearmanr(proxy, final).statistic) if len(records) > 2 else float("nan")
                r[name] = round(rho, 3)
            rows[f"epoch{e + 1}"] = r
        gap = max((abs(rec["per_epoch"][e][which]["clean_acc"] - rec["final"]["clean_acc"])
                   for rec in records for e in range(1, args.epochs)), default=0.0)
        summary[which] = {"spearman": rows, "max_clean_gap_from_epoch2": round(gap, 3)}
        print(f"{which}: max |proxy clean - final clean| from epoch 2 on = {gap:.3f}")
        for k, r in rows.items():
            print(f"  {which} {k}: spearman clean {r['clean']:+.2f} robust {r['robust']:+.2f} box {r['box']:+.2f}")
    summary["final_recalibration_max_change"] = round(max(
        abs(r["final_clean_plain"] - r["final_clean_recalibrated"]) for r in records), 4)
    summary["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
