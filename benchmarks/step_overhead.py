"""Per-step cost of Binary-Relax training against plain float adversarial training.

Three configurations of the same model (ResNet20 width 16, one member, noise 0.1 by default),
the same batch of CIFAR-shaped random inputs and the same PGD attack steps:

  br           4-bit BR (relaxed phase) + group-lasso penalty (1e-4, penalty mode) + `mix` loss (alpha 0.2)
  float_mix    32-bit float, no penalty, `mix` loss (alpha 0.2)
  float_madry  32-bit float, no penalty, `madry` loss (the plain EnResNet PGD step)

Each step is `trainables.loop.Run.train_step` (attack, loss, penalty, backward, SGD step), the
code path training uses. After warm-up the three configurations alternate in one process
(the order rotates each round) and per-step medians are compared:

  ratio              = br / float_madry  the headline figure: the full BR step against a plain
                                         float PGD step (includes the natural forward/backward
                                         that the `mix` loss needs and `madry` does not)
  ratio_vs_float_mix = br / float_mix    what BR quantization and the penalty alone add

The last stdout line is a JSON object with the figures.

    python benchmarks/step_overhead.py                     # CUDA if present, else CPU
    python benchmarks/step_overhead.py --device cpu --rounds 10
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from trainables.config import TrainConfig
from trainables.data import DataBundle, Split
from trainables.loop import Run, pick_device

CONFIGS = {
    "br": dict(bits=4, group_lasso=1e-4, loss="mix"),
    "float_mix": dict(bits=32, group_lasso=0.0, loss="mix"),
    "float_madry": dict(bits=32, group_lasso=0.0, loss="madry"),
}
LABELS = {
    "br": "BR 4-bit + group penalty + mix",
    "float_mix": "float + mix",
    "float_madry": "float + madry (PGD only)",
}


def random_data(batch: int, seed: int = 0) -> DataBundle:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    small = Split(x[:2], y[:2])
    return DataBundle("random", Split(x, y), small, small, 10, augment=False)


def build(name: str, args: argparse.Namespace, data: DataBundle) -> Run:
    spec = CONFIGS[name]
    cfg = TrainConfig(
        dataset="digits",  # not loaded: the synthetic bundle is passed in
        depth=args.depth, width=args.width, ensemble=1, noise=args.noise,
        batch_size=args.batch, epochs=4, lr=0.01, loss=spec["loss"], alpha=0.2,
        group_lasso=spec["group_lasso"], group_mode="penalty", device=args.device,
    )
    cfg.quant.bits = spec["bits"]
    cfg.train_attack.steps = args.steps
    run = Run(cfg, data)
    run.model.train()
    run.br.start_epoch(0, cfg.epochs)  # phase I (relaxed), where most of training happens
    return run


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--batch", type=int, default=None, help="default 128 on CUDA, 32 on CPU")
    p.add_argument("--steps", type=int, default=10, help="PGD steps of the training attack")
    p.add_argument("--rounds", type=int, default=20, help="timed rounds (one step of each config)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps of each config first")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--noise", type=float, default=0.1)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    args.device = str(device)
    if args.batch is None:
        args.batch = 128 if device.type == "cuda" else 32

    data = random_data(args.batch)
    runs = {name: build(name, args, data) for name in CONFIGS}
    x, y = data.train.to_float(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(run: Run) -> float:
        sync()
        t0 = time.perf_counter()
        run.train_step(x, y)  # ends with loss.item(), a sync point
        sync()
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        for run in runs.values():
            step(run)
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            times[n].append(step(runs[n]))

    med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    paired = statistics.median(b / f for b, f in zip(times["br"], times["float_madry"]))
    result = {
        "ratio": med["br"] / med["float_madry"],
        "ratio_vs_float_mix": med["br"] / med["float_mix"],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": args.batch,
        "attack_steps": args.steps,
        "step_ms_br": med["br"],
        "step_ms_float_mix": med["float_mix"],
        "step_ms_float_madry": med["float_madry"],
        "ratio_paired_median": paired,
        "rounds": args.rounds,
        "depth": args.depth,
        "width": args.width,
        "threads": torch.get_num_threads(),
    }

    print(f"device {result['device']}  batch {args.batch}  PGD steps {args.steps}  "
          f"ResNet{args.depth} width {args.width}  rounds {args.rounds} (+{args.warmup} warm-up)  "
          f"torch threads {result['threads']}")
    print(f"{'configuration':<34}{'median ms':>11}{'min ms':>10}{'max ms':>10}")
    for n in names:
        t = [v * 1e3 for v in times[n]]
        print(f"{LABELS[n]:<34}{med[n]:>11.1f}{min(t):>10.1f}{max(t):>10.1f}")
    print(f"ratio (BR+penalty+mix / float madry PGD)         {result['ratio']:.3f}  "
          f"(median of per-round ratios {paired:.3f})")
    print(f"ratio_vs_float_mix (BR+penalty+mix / float+mix)  {result['ratio_vs_float_mix']:.3f}")
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
