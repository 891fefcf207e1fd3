"""Training epoch images/second of this tree's `trainables` against an older commit's, side by side.

`trainables/` of --before REF is exported (`git archive`) into a temporary folder; then, round
after round, one child process per version (the order alternating) loads the data, builds
`trainables.loop.Run`, runs one untimed warm-up epoch and times --epochs epochs of
`Run.train_epoch` (EnResNet depth 8, width 4, 4-bit BR, PGD-2 training by default: small, so
the data path, host syncs and projections weigh more than in a real run). Process start-up and
data loading are not timed. Medians per version, and
their ratio (after / before; > 1: this tree is faster), per data set, both per wall-clock second
and per second of the child's CPU time (steadier on a shared machine). Last stdout line: JSON.

    python benchmarks/cpu_before_after.py --before 395dfe8                 # digits
    python benchmarks/cpu_before_after.py --before 395dfe8 --cifar10      # + shared CIFAR-10 copy
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"

CHILD = r"""
import json, sys, time, torch
from trainables.config import TrainConfig
from trainables.data import load_data
from trainables.loop import Run
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec.pop("threads"))
epochs = spec.pop("timed_epochs")
cfg = TrainConfig.from_flat(spec)
data = load_data(cfg)
run = Run(cfg, data)
run.train_epoch()  # warm-up
times, cpu = [], []
for _ in range(epochs):
    t0, c0 = time.perf_counter(), time.process_time()
    run.train_epoch()
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
print(json.dumps({"n": len(data.train), "times": times, "cpu": cpu}))
"""


def child(tree: Path, spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, cwd=tree,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="git commit of the 'before' trainables")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per child")
    p.add_argument("--threads", type=int, default=1, help="torch threads per child (1: steadier on a shared machine)")
    p.add_argument("--cifar10", action="store_true", help=f"also CIFAR-10 from {ARCHIVE}")
    p.add_argument("--cifar-subset", type=int, default=512, help="CIFAR-10 training images per epoch")
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--attack-steps", type=int, default=2)
    a = p.parse_args(argv)

    # a small model, so what differs between the versions (data path, host syncs, projections)
    # weighs more against the convolutions than in a real run
    common = {"depth": 8, "width": a.width, "bits": 4, "attack_steps": a.attack_steps, "batch_size": 128,
              "eval_attack.steps": 1, "proxy_eval_size": 64, "threads": a.threads, "timed_epochs": a.epochs,
              "device": "cpu"}
    sets = {"digits": {**common, "dataset": "digits"}}
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # 60,000 small files unpack fast there
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        tmp = Path(tmp)
        before = tmp / "before"
        before.mkdir()
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", a.before, "trainables"],
                             capture_output=True, check=True).stdout
        subprocess.run(["tar", "x", "-C", str(before)], input=tar, check=True)
        if a.cifar10:
            sys.path.insert(0, str(ROOT))
            from trainables.data import unpack_archive

            folder = unpack_archive(ARCHIVE, tmp / "data")
            sets["cifar10"] = {**common, "dataset": f"folder:{folder}",
                               "subset_train": a.cifar_subset + a.cifar_subset // 9, "subset_test": 64}
        trees = {"before": before, "after": ROOT}
        result: dict = {"before": a.before, "threads": a.threads, "rounds": a.rounds, "epochs": a.epochs,
                        "load_avg": os.getloadavg()[0]}
        for name, spec in sets.items():
            rates: dict[str, list[float]] = {"before": [], "after": []}
            cpu_rates: dict[str, list[float]] = {"before": [], "after": []}
            for r in range(a.rounds):
                order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
                for v in order:
                    out = child(trees[v], dict(spec))
                    rates[v] += [out["n"] / t for t in out["times"]]
                    cpu_rates[v] += [out["n"] / t for t in out["cpu"]]
            med = {v: statistics.median(x) for v, x in rates.items()}
            cmed = {v: statistics.median(x) for v, x in cpu_rates.items()}
            result[name] = {"images": out["n"], "before_img_s": med["before"], "after_img_s": med["after"],
                            "ratio": med["after"] / med["before"],
                            "before_img_per_cpu_s": cmed["before"], "after_img_per_cpu_s": cmed["after"],
                            "cpu_ratio": cmed["after"] / cmed["before"]}
            print(f"{name:<8} {out['n']} images/epoch: before {med['before']:.1f} img/s, "
                  f"after {med['after']:.1f} img/s, after/before {med['after'] / med['before']:.3f}; "
                  f"per CPU second: before {cmed['before']:.1f}, after {cmed['after']:.1f}, "
                  f"after/before {cmed['after'] / cmed['before']:.3f}", flush=True)
        result["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
