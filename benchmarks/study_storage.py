"""What one suggest costs the driver at 1,000 trials, by Optuna storage.

The sampler as the CLI builds it (`make_sampler("tpe", ...)`, 16 at once), the quick start's
digits space, trials told as a MO-ASHA sweep tells them (16 pending, about 60 % PRUNED), against
an in-memory study, the sqlite RDB storage and the journal file
(the default now). Prints CPU ms per ask and per tell, averaged over all trials and over the
last 20 (the marginal cost at --trials), and the ratios to the journal, side by side.

    python benchmarks/study_storage.py                 # 1,000 trials each
    python benchmarks/study_storage.py --trials 300
    python benchmarks/study_storage.py --sampler gp --storages journal --trials 300

The last stdout line is JSON.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(kind: str, n: int, tmp: Path, sampler: str = "tpe") -> dict[str, float]:
    import optuna
    from optuna.trial import TrialState

    from search.optimizer import load_space, make_sampler
    from search.storage import open_study_storage

    storage = {"memory": None, "sqlite": open_study_storage({"sqlite": str(tmp / f"{kind}.db")}),
               "journal": open_study_storage({"journal": str(tmp / f"{kind}.journal")})}[kind]
    study = optuna.create_study(directions=["maximize"] * 3, sampler=make_sampler(sampler, 0, 16), storage=storage)
    space, rng, pending = load_space("digits"), random.Random(0), []
    ask = tell = last = 0.0
    for i in range(n):
        t0 = time.process_time()
        trial = study.ask()
        space.suggest(trial)
        dt = time.process_time() - t0
        ask += dt
        last += dt if i >= n - 20 else 0.0
        pending.append(trial)
        if len(pending) > 16:
            t0 = time.process_time()
            done = pending.pop(0)
            if rng.random() < 0.6:
                study.tell(done, state=TrialState.PRUNED)
            else:
                study.tell(done, [rng.random(), 0.5 * rng.random(), 0.3 * rng.random()])
            tell += time.process_time() - t0
    return {"ask_ms": round(1000 * ask / n, 1), "tell_ms": round(1000 * tell / max(1, n - 16), 2),
            "last20_ask_ms": round(1000 * last / 20, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--sampler", default="tpe", help="as --sampler of search.pareto (gp: its cost at scale)")
    p.add_argument("--storages", nargs="+", default=["memory", "sqlite", "journal"])
    args = p.parse_args()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as d:
        out = {kind: run(kind, args.trials, Path(d), args.sampler) for kind in args.storages}
    print(f"{'storage':8} {'ask ms':>8} {'tell ms':>8} {'last-20 ask ms':>15} {'ask / journal':>14}")
    ref = out.get("journal", next(iter(out.values())))["ask_ms"]
    for kind, r in out.items():
        print(f"{kind:8} {r['ask_ms']:8.1f} {r['tell_ms']:8.2f} {r['last20_ask_ms']:15.1f} {r['ask_ms'] / ref:14.2f}")
    print(json.dumps({"trials": args.trials, "sampler": args.sampler, **out}))


if __name__ == "__main__":
    main()
