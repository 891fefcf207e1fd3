"""docs/findings.md as Markdown, from the rows' results and the run's metadata."""
from __future__ import annotations

import math
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from trainables.contract import CHANNEL_SPARSITY
from trainables.robust_eval import AA_PROTOCOL, StrongEvalConfig, protocol
from trainables.sanity import FLAGS

from .grid import (
    DEFAULT_SCALE,
    REFERENCE_EN1,
    REPO,
    ROWS,
    RowSpec,
    Scale,
)
from .verdicts import (
    Verdict,
    flag_line,
    m,
    mean_sd,
    pct,
    tripped,
    verdict_a,
    verdict_b,
    verdict_c,
)


def eps_str(e: float) -> str:
    """8/255 for multiples of 1/255, else the number."""
    n = e * 255
    return f"{round(n)}/255" if abs(n - round(n)) < 1e-6 else f"{e:g}"


def aa_key(st: dict) -> str:
    """The suite's result key for its APGD pair: 'aa' under the published protocol, else 'apgd'."""
    return "aa" if all(st.get(k) == v for k, v in AA_PROTOCOL.items()) else "apgd"


def aa_label(st: dict) -> str:
    if aa_key(st) == "aa":
        return "AutoAttack-rand"
    return f"APGD-CE+DLR ({st['aa_steps']} it., EOT {st['aa_eot']})"


def fmt(res: dict, key: str) -> str:
    if key in res["per_seed"]:
        mu, sd = mean_sd(res["per_seed"][key])
        return f"{mu:.1f} ± {sd:.1f}"
    v = res.get("strong", {}).get(f"{key}_acc")
    return "–" if v is None else f"{100 * v:.1f}"


def size_str(s: dict) -> str:
    kib = s["size_bits"] / 8 / 1024
    return f"{kib:.1f} KiB ({s['compression']:.1f}x)"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__} with {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        dev += f", GPU {torch.cuda.get_device_name(0)}"
    return f"{dev}; {platform.system()} {platform.release()}, Python {platform.python_version()}"


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + (" (with uncommitted changes to tracked files)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def previous_findings(text: str) -> dict:
    """From an earlier findings.md: each claim's verdict and each row's clean and PGD-20 mean."""
    verdicts = {mt.group(1): mt.group(2) for mt in
                re.finditer(r"^\*\*\((\w)\) .*?\*\* Verdict: \*\*(.+?)\*\*\.", text, re.MULTILINE)}
    rows: dict[str, dict[str, float]] = {}
    header = next((ln for ln in text.splitlines() if ln.startswith("| row |")), None)
    if header:
        cols = [c.strip() for c in header.strip().strip("|").split("|")]
        for ln in text.splitlines():
            mt = re.match(r"^\| `([\w-]+)` \|", ln)
            if not mt:
                continue
            cells = [c.strip() for c in ln.strip().strip("|").split("|")]
            vals = {}
            for name, key in (("clean", "clean"), ("PGD-20", "pgd")):
                if name in cols:
                    num = re.match(r"[\d.]+", cells[cols.index(name)])
                    if num:
                        vals[key] = float(num.group())
            rows[mt.group(1)] = vals
    return {"verdicts": verdicts, "rows": rows}


def _changes(L: list[str], prev: dict, verdicts: list[Verdict], R: dict[str, dict]) -> None:
    w = L.append
    w("## What changed since the previous version")
    w("")
    moved = []
    for v in verdicts:
        letter = v.claim[1]
        old = prev["verdicts"].get(letter)
        if old is None:
            continue
        moved.append(f"({letter}) {old} -> **{v.status}**" if old != v.status else f"({letter}) {old} (unchanged)")
    w("Verdicts against the previous version: " + ("; ".join(moved) if moved else "none to compare") + ".")
    w("")
    deltas = []
    for rid, old in prev["rows"].items():
        if rid in R and "clean" in old and "pgd" in old:
            deltas.append(f"`{rid}` clean {m(R[rid], 'clean') - old['clean']:+.1f} pp, PGD-20 "
                          f"{m(R[rid], 'pgd') - old['pgd']:+.1f} pp")
    if deltas:
        w("Per row, this run minus the previous one: " + "; ".join(deltas) + ".")
        w("")


def render(meta: dict, R: dict[str, dict], rows: list[RowSpec], scale: Scale, full: bool) -> str:
    L: list[str] = []
    w = L.append
    gl = meta["group_lasso"]
    st = meta["strong"]
    eps = meta.get("eps", st["eps"])
    where = "CIFAR-10" if "cifar" in meta["data"].lower() else meta["data"]
    verdicts = [verdict_a(R), verdict_b(R), verdict_c(R, gl, meta["alpha"])]
    w(f"# Findings: Binary-Relax quantized, adversarially trained EnResNet on {where}")
    w("")
    w("Generated by `python -m report` (the `report` package); every number and every verdict "
      "below is computed by it from this run. Do not edit by hand: regenerate it.")
    w("")
    w("## How to regenerate")
    w("")
    w("```bash")
    w(meta["command"])
    w("```")
    w("")
    w("- Default scale: `python -m report` (uses the shared CIFAR-10 JPEG copy, unpacked once to "
      "`~/.cache/brsearch/cifar10-jpeg`; or `--cifar PATH`, or `--dataset cifar10 --data-root DIR "
      "--download` for torchvision's copy).")
    w("- Paper scale (a GPU; days of compute): `python -m report --full --device cuda`.")
    w("- A subset of rows: `--rows ternary-madry,ternary-mix` (each quantized row brings the float "
      "row of its loss, the transfer-attack source). Rows: " + ", ".join(f"`{r}`" for r in ROWS) + ".")
    w("- `python -m report --help` lists every flag (`--epochs`, `--subset-train`, `--subset-test`, "
      "`--strong-subset`, `--aa-steps`, `--square-queries`, `--eot-samples`, `--eval-seeds`, "
      "`--out`, `--device`, `--previous`, ...).")
    w("")
    if meta.get("previous"):
        _changes(L, meta["previous"], verdicts, R)
    w("## Run")
    w("")
    w(f"- Command: `{meta['command']}`")
    w(f"- Git SHA: {meta['git']}")
    w(f"- Machine: {meta['machine']}")
    w(f"- Wall time: {meta['wall_s'] / 60:.1f} min (training {meta['train_s'] / 60:.1f} min, "
      f"evaluation {meta['eval_s'] / 60:.1f} min, summed over rows)")
    secs = meta.get("strong_seconds") or {}
    if secs:
        w("- Strong suite cost, summed over rows: " + ", ".join(
            f"{k} {v / 60:.1f} min" for k, v in sorted(secs.items(), key=lambda kv: -kv[1])) + ".")
    w(f"- Strong-suite protocol: {protocol(StrongEvalConfig(**meta['strong']))}.")
    w(f"- Data: {meta['data']}")
    if meta.get("load"):
        w(f"- Load average at the start and the end: {meta['load']} (other jobs shared the machine "
          "when it is above the core count; wall times are then longer than on an idle machine).")
    w("")
    w("## Scale")
    w("")
    ntr, nval, nte = meta["n_train"], meta["n_val"], meta["n_test"]
    nst = meta["n_strong"]
    w(f"- Scale: **{'full (paper setting)' if full else 'reduced'}**; rows run "
      f"{meta['jobs']} at a time, {meta['threads'] or 'default'} torch thread(s) each.")
    if not full and scale != DEFAULT_SCALE:
        diff = [f"{f} {getattr(scale, f)} (default {getattr(DEFAULT_SCALE, f)})"
                for f in ("subset_train", "subset_test", "strong_subset", "epochs", "eval_seeds", "width", "depth")
                if getattr(scale, f) != getattr(DEFAULT_SCALE, f)]
        if diff:
            w("- **Smaller or other than the default scale** (`python -m report` without scale flags): "
              + ", ".join(diff) + ".")
    if scale.subset_train == DEFAULT_SCALE.subset_train and not full:
        w("- How the default was sized: on an idle 2-core machine a PGD-3 training step costs about "
          "13 ms per image and a PGD/CW attack step about 2.5 ms per image on one thread; the grid "
          "(9 trainings, 3 x 42 attack steps per test image per row, the transfer crafting) with "
          "1,000 test images took 32 min before the strong suite was added. The strong suite "
          "ran on the first 500 test images, its attacks on every image; its cost per row is in "
          "the cost table below; `--subset-test`, `--strong-subset` and `--aa-steps` / `--aa-eot` "
          "(which make it APGD, not AutoAttack-rand) are the knobs on a shared machine.")
    w(f"- Training images: {ntr} (plus {nval} held out as a validation split, unused here); "
      f"augmentation: {'random crop (pad 4) + horizontal flip' if meta['augment'] else 'none'}.")
    w(f"- Test images: {nte} (fixed subset, the same for every row); the strong suite runs on the "
      f"first {nst} of them.")
    w(f"- Model: pre-activation ResNet{scale.depth}, width {scale.width} "
      f"(stages {scale.width}/{2 * scale.width}/{4 * scale.width}), noise coefficient 0.1 after "
      "every block (on at test time too); En1 unless stated.")
    w(f"- Training: {scale.epochs} epochs, batch {scale.batch_size}, SGD (Nesterov, momentum 0.9, "
      f"weight decay 5e-4), lr 0.1 x0.1 at 50% and 75% of the epochs; training attack PGD-"
      f"{scale.attack_steps}, eps {eps_str(eps)}, step {meta['train_step'] * 255:.2f}/255 (2.5 eps / steps), "
      "random start.")
    w(f"- Binary-Relax: {meta['br']}; stem and 3x3 convolutions quantized (one scale per layer), 1x1 "
      "shortcuts, BN and the classifier float; ternary = the reference 0.7 mean|w| threshold rule; "
      "4-bit = one Lloyd step.")
    w(f"- Losses: `madry` = CE(f(x_adv)); `mix + group` = (1 - alpha) CE(f(x_adv)) + alpha CE(f(x)) "
      f"with alpha = {meta['alpha']:g}, plus the proximal group-lasso step on output filters with "
      f"lambda_g = {gl:.4g} (= {meta['group_shrink']:g} / sum_t lr_t, sum_t lr_t = "
      f"{meta['sum_lr']:.1f} over {meta['steps']} optimizer steps: the total shrinkage per filter "
      "norm is then fixed, so the penalty acts at this scale).")
    w(f"- Seeded attacks: {len(meta['seeds'])} seeds of the test-time noise (seeds {meta['seeds']}), "
      f"mean ± sd (sample sd), one noise draw per image. FGSM eps {eps_str(eps)}; PGD-{scale.eval_steps}: "
      f"eps {eps_str(eps)}, step {eps_str(eps / 4)}, "
      f"random start, CE loss; CW-Linf: the same PGD on the margin loss max_(j != y) Z_j - Z_y "
      "(our definition; not the rescaled C&W-L2 of the EnResNet scripts)"
      + (f"; IFGSM-{scale.eval_steps}: as PGD without random start (the EnResNet protocol)"
         if scale.ifgsm else "") + ". All on the fully quantized weights, model in eval mode.")
    w(f"- Strong suite (trainables.robust_eval, one run per row, seed {st['seed']}, eps {eps_str(eps)}): "
      f"**{aa_label(st)}** = APGD-CE then APGD-DLR (torchattacks' APGD iteration on every point), "
      f"{st['aa_steps']} iterations, {st['aa_restarts']} restart(s), gradients averaged over {st['aa_eot']} "
      f"noise draws (EOT)" + ("" if aa_key(st) == "aa" else
                             " — fewer than the published 100 iterations x EOT 20, so not AutoAttack-rand") +
      f"; **Square** (gradient-free, margin loss, {st['square_queries']} queries, p_init "
      f"{st['square_p_init']:g}, " + ("on the noise-free model" if not st.get("square_draws") else
                                      f"on the logits averaged over {st['square_draws']} draws") +
      f"); **EOT-PGD-{st['eot_steps']}**: our PGD with each gradient averaged over {st['eot_samples']} "
      f"noise draws. One scoring for clean and every attack there, on the same images: each image is "
      f"scored by its expected correctness over {st.get('score_draws', 20)} noise draws, an attack keeps "
      "per image its strongest iterate, and an image counts robust only as far as it is clean-correct "
      "(so every attack <= suite clean); the worst case is per image the lowest over all attacks at eps. "
      "Single runs (no ±).")
    w(f"- Transfer: PGD-{scale.eval_steps} examples crafted white-box on the float model trained "
      "with the same loss (same seed), then classified by the quantized model.")
    w("")
    w("## Results")
    w("")
    ifg = scale.ifgsm
    k = scale.eval_steps
    head = ["row", "model", "precision", "loss", "clean", "FGSM", f"PGD-{k}"]
    if ifg:
        head.append(f"IFGSM-{k}")
    head += ["CW-L∞", "suite clean", f"EOT-PGD-{st['eot_steps']}", aa_label(st), "Square", "worst case",
             f"transfer PGD-{k}", "weight sparsity", "channel sparsity (out / in)", "size", "sanity flags"]
    w("| " + " | ".join(head) + " |")
    w("|" + "---|" * len(head))
    for spec in rows:
        r = R[spec.id]
        s = r["structure"]
        cells = [f"`{spec.id}`", spec.model_label, spec.precision, spec.loss_label,
                 fmt(r, "clean"), fmt(r, "fgsm"), fmt(r, "pgd")]
        if ifg:
            cells.append(fmt(r, "ifgsm"))
        flags = tripped(r)
        cells += [fmt(r, "cw"), fmt(r, "suite_clean"), fmt(r, "eot_pgd"), fmt(r, aa_key(st)), fmt(r, "square"),
                  fmt(r, "worst"), fmt(r, "transfer"),
                  pct(100 * s["weight_sparsity"]),
                  f"{pct(100 * s[CHANNEL_SPARSITY])} / {pct(100 * s['channel_sparsity_in'])}",
                  size_str(s), ("**" + ", ".join(f.removeprefix("flag_") for f in flags) + "**") if flags else "none"]
        w("| " + " | ".join(cells) + " |")
    w("")
    w("Accuracies in % of the test images (every image counts). Seeded attacks: mean ± sd over the "
      "evaluation seeds; the sd covers the test-time noise only, not the training seed (one "
      f"training run per row). Suite clean, EOT-PGD, {aa_label(st)}, Square and the worst case: one "
      f"run of the strong suite on the first {nst} test images, scored as above. Sparsity is counted on the quantized weights (stem + 3x3 convs, all members); "
      "channel sparsity = all-zero output filters / all-zero input channels. Size = bits of the "
      "deployed weights (b per quantized weight + one 32-bit scale per layer, 32 bits per float "
      "parameter), compression against all-float in brackets.")
    w("")
    _sanity(L, R, rows, scale, st, nst)
    if "float-madry" in R and "float-madry-en2" in R:
        a, b = R["float-madry"], R["float-madry-en2"]
        w("### En1 against En2 (float, madry)")
        w("")
        keys = [("clean", "clean"), ("fgsm", "FGSM"), ("pgd", f"PGD-{k}"), ("cw", "CW-L∞"),
                (aa_key(st), aa_label(st))]
        if ifg:
            keys.insert(3, ("ifgsm", f"IFGSM-{k}"))
        w("En2 minus En1: " + ", ".join(f"{lab} {m(b, key) - m(a, key):+.1f} pp" for key, lab in keys)
          + f"; size {b['structure']['size_bits'] / a['structure']['size_bits']:.1f}x. "
          "The EnResNet poster reports En2 above En1 by +3.1 pp clean, +1.9 pp FGSM, +1.0 pp "
          "IFGSM-20 at full scale.")
        w("")
    w("## The paper's claims at this scale")
    w("")
    for v in verdicts:
        w(f"**{v.claim}** Verdict: **{v.status}**.")
        w("")
        for line in v.lines:
            w(f"- {line}")
        w("")
    _reference(L, R, full, ifg)
    _limits(L, meta, scale, full, ntr, nte, nst)
    return "\n".join(L) + "\n"


def _sanity(L: list[str], R: dict, rows: list[RowSpec], scale: Scale, st: dict, nst: int) -> None:
    w = L.append
    k = scale.eval_steps
    w("### Sanity battery (Carlini et al. 2019)")
    w("")
    w("Each check is a named flag; a tripped flag means that row's robust accuracies are not "
      "trustworthy as measured. Each comparison is a paired test on the same "
      f"{nst} images: McNemar's exact test (one-sided exact binomial on the images where the two "
      "attacks disagree, an image being right when most of its noise draws are), tripped at "
      f"p < {st.get('alpha', 0.001):g}.")
    w("")
    for name in FLAGS:
        w(f"- {flag_line(name)}")
    steps = sorted({*st["sanity_steps"], k})
    factors = sorted({*st["sanity_eps_factors"], 1.0})
    w("")
    w(f"Checks as run: PGD at {', '.join(map(str, steps))} steps (step {eps_str(st['pgd_step'] or st['eps'] / 4)}); PGD-{k} at "
      f"{', '.join(f'{f:g}' for f in factors)} x eps; CW-Linf PGD-{k} at eps {st['large_eps']:g} (must "
      f"reach at most {100 * st['near_zero']:g}% accuracy); the white-box attacks together (per image "
      f"the lowest of PGD-{k}, EOT-PGD, {aa_label(st)}) against Square and against the transfer attack "
      f"(quantized rows); EOT-PGD and {aa_label(st)} against PGD-{k}; every attack's images against the "
      "clean ones.")
    w("")
    w("| row | " + " | ".join(f"PGD-{s}" for s in steps) + " | " + " | ".join(f"{f:g} eps" for f in factors)
      + f" | eps {st['large_eps']:g} | best white-box | Square | transfer | tripped |")
    w("|" + "---|" * (len(steps) + len(factors) + 6))
    for spec in rows:
        s = R[spec.id]["strong"]

        def a(key: str, s: dict = s) -> str:
            v = s.get(key)
            return "–" if v is None else f"{100 * v:.1f}"

        stp = [a("pgd_acc" if n == k else f"pgd_steps{n}_acc") for n in steps]
        eps = [a("pgd_acc" if f == 1 else f"pgd_eps{f:g}_acc") for f in factors]
        white = [v for v in (s.get("pgd_acc"), s.get("eot_pgd_acc"), s.get(f"{aa_key(st)}_acc")) if v is not None]
        best = f"{100 * min(white):.1f}" if white else "–"
        t = tripped(R[spec.id])
        w(f"| `{spec.id}` | " + " | ".join(stp) + " | " + " | ".join(eps)
          + f" | {a('large_eps_acc')} | {best} | {a('square_acc')} | {a('transfer_acc')} | "
          + (", ".join(f"**{x}**" for x in t) if t else "none") + " |")
    w("")
    bad = [spec.id for spec in rows if tripped(R[spec.id])]
    if bad:
        w("Rows with a tripped flag: " + ", ".join(f"`{b}`" for b in bad) + ". For these rows read "
          "the lowest accuracy in the row as an upper bound at best.")
    else:
        w("No row trips a flag: the robust accuracies above pass every check of the battery.")
    w("")


def _reference(L: list[str], R: dict, full: bool, ifg: bool) -> None:
    w = L.append
    w("## Against the EnResNet reference")
    w("")
    if full and "float-madry" in R:
        r = R["float-madry"]
        ref = REFERENCE_EN1
        got = {"clean": m(r, "clean"), "fgsm": m(r, "fgsm"), "ifgsm": m(r, "ifgsm") if ifg else None}
        w("Float En1ResNet20 (madry, PGD-10 training) against the EnResNet poster (CIFAR-10):")
        w("")
        w("| metric | this run | reference | difference |")
        w("|---|---|---|---|")
        for key, lab in (("clean", "clean"), ("fgsm", "FGSM"), ("ifgsm", "IFGSM-20")):
            if got[key] is None:
                continue
            w(f"| {lab} | {pct(got[key])} | {pct(ref[key])} | {got[key] - ref[key]:+.2f} pp |")
        w("")
        w("Differences to expect: the JPEG-re-encoded copy (if used) shifts pixel values; 10% of "
          "the training images are held out for validation; the reference checkpoint was selected "
          "on the test set, ours is the last epoch; the reference IFGSM step size is not certain.")
    else:
        w("The comparison of the float En1ResNet20 row with the EnResNet reference (77.21% clean, "
          "55.35% FGSM, 49.06% IFGSM-20 on CIFAR-10) needs the full setting (`--full`: ResNet20 "
          "width 16, PGD-10 training, 200 epochs, all training images, 10,000 test images) and is "
          "**not made** here: at this scale the absolute accuracies are far below the reference "
          "by construction, and the difference would say nothing about the implementation.")
    w("")


def _limits(L: list[str], meta: dict, scale: Scale, full: bool, ntr: int, nte: int, nst: int) -> None:
    w = L.append
    w("## What this scale can and cannot show")
    w("")
    if full:
        w("- This is the paper's training setting; one training seed per row, so differences "
          "between rows of about a point are within training noise.")
    else:
        w(f"- The models are small and briefly trained ({scale.epochs} epochs on {ntr} images, "
          f"PGD-{scale.attack_steps}), so absolute accuracies are far below the paper's; only "
          "comparisons between rows trained identically here are meaningful, and even those can "
          "change with the budget (e.g. binary rows may not have converged).")
        w(f"- Each row is one training run; the ± is test-time noise over {len(meta['seeds'])} "
          f"seeds on {nte} test images. The sampling error of an accuracy on {nte} images alone is "
          f"about ±{100 * math.sqrt(0.25 / max(1, nte)):.1f} pp (±{100 * math.sqrt(0.25 / max(1, nst)):.1f} "
          f"pp on the {nst} images of the strong suite), and the training-seed spread is not "
          "measured: treat differences of a couple of points as noise.")
        w("- The group-penalty strength is tied to this schedule (fixed total shrinkage); the "
          "same lambda_g would act very differently in a 200-epoch run.")
    w("- Sparsity of the ternary rule is partly by construction: the 0.7 mean|w| threshold "
      "zeros about 40% of normally distributed weights, and 4-bit zeros entries below max|w|/15.")
    w("- Claim (c) depends on our reconstruction of the trade-off loss (the paper's equation was "
      "not available; docs/training.md) and on one alpha and one lambda_g.")
    w(f"- {aa_label(meta['strong'])} here: {meta['strong']['aa_steps']} APGD iterations, EOT "
      f"{meta['strong']['aa_eot']}; any attack gives an upper bound on robust accuracy. Passing the sanity battery rules out the usual symptoms "
      "of masked gradients; it does not prove robustness.")
    w("")
