"""L-infinity attacks (algorithms.md 2.5) and the trade-off loss (3.2) on real models."""

import pytest
import torch
import torch.nn.functional as F

from _stats import allowed_failures
from trainables.attacks import margin_loss, perturb, pgd, trades_kl
from trainables.config import AttackConfig, TrainConfig
from trainables.device import autocast
from trainables.loop import Run
from trainables.losses import tradeoff_loss
from trainables.models import build_model

TOL = 1e-6


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    model = build_model(8, 8, 3, 10, ensemble=2, noise=0.1).eval()
    x = torch.rand(16, 3, 16, 16)
    x[:4] = (x[:4] > 0.5).float()  # images saturated at 0 and 1: the [0, 1] clamp matters
    y = torch.randint(0, 10, (16,))
    return model, x, y


def _check_in_ball(x_adv, x, eps):
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert float((x_adv - x).abs().max()) <= eps + TOL
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


@pytest.mark.parametrize("random_start", [True, False])
def test_pgd_stays_in_ball_and_box(model_and_batch, random_start):
    model, x, y = model_and_batch
    eps = 0.05
    x_adv = perturb(model, x, y, AttackConfig("pgd", eps, 0.02, 7, random_start))
    _check_in_ball(x_adv, x, eps)
    # the attack moved the inputs up to the ball's surface
    assert float((x_adv - x).abs().max()) == pytest.approx(eps, abs=TOL)
    inner = (x > eps) & (x < 1 - eps)
    assert float((x_adv - x)[inner].abs().mean()) > eps / 2


def test_fgsm_is_one_signed_step(model_and_batch):
    model, x, y = model_and_batch
    eps = 0.03
    _check_in_ball(perturb(model, x, y, AttackConfig("fgsm", eps, 0.0, 1, False)), x, eps)
    # without noise the step is exactly eps * sign(grad) wherever the box does not clip it
    torch.manual_seed(0)
    quiet = build_model(8, 8, 3, 10, ensemble=1, noise=0.0).eval()
    x_adv = perturb(quiet, x, y, AttackConfig("fgsm", eps, 0.0, 1, False))
    _check_in_ball(x_adv, x, eps)
    x_ = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(quiet(x_), y, reduction="sum"), x_)
    inner = (x > eps) & (x < 1 - eps)
    assert inner.sum() > 1000
    assert torch.allclose((x_adv - x)[inner], eps * g.sign()[inner], atol=TOL)


def test_cw_margin_attack_stays_in_ball(model_and_batch):
    model, x, y = model_and_batch
    eps = 0.04
    torch.manual_seed(1)
    x_adv = perturb(model, x, y, AttackConfig("cw", eps, 0.01, 10, True))
    _check_in_ball(x_adv, x, eps)
    assert float((x_adv - x).abs().max()) > eps / 2


def test_cw_ascends_the_margin_not_the_cross_entropy(model_and_batch):
    """One CW step without random start is exactly eps * sign(grad of the CW margin) wherever the
    box does not clip it, and that direction differs from the cross-entropy one: a CW computed
    with cross-entropy fails here."""
    _, x, y = model_and_batch
    eps = 0.03
    torch.manual_seed(0)
    quiet = build_model(8, 8, 3, 10, ensemble=1, noise=0.0).eval()
    x_adv = perturb(quiet, x, y, AttackConfig("cw", eps, eps, 1, False))
    _check_in_ball(x_adv, x, eps)
    x_ = x.clone().requires_grad_(True)
    (g_margin,) = torch.autograd.grad(margin_loss(quiet(x_), y), x_)
    x_ = x.clone().requires_grad_(True)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(quiet(x_), y, reduction="sum"), x_)
    inner = (x > eps) & (x < 1 - eps)
    assert torch.allclose((x_adv - x)[inner], eps * g_margin.sign()[inner], atol=TOL)
    # the two losses really point elsewhere on this batch, so the check above can tell them apart
    differ = (g_margin.sign() != g_ce.sign())[inner].float().mean()
    assert differ > 0.05, float(differ)


def test_pgd_random_start_is_uniform_in_the_ball(model_and_batch):
    """With step 0 PGD returns its random start: uniform in [-eps, eps] around x (clamped), new on
    every call; without random start it returns x. A random start that is ignored fails here."""
    _, x, y = model_and_batch
    eps = 0.05
    torch.manual_seed(0)
    quiet = build_model(8, 8, 3, 10, ensemble=1, noise=0.0).eval()
    a = perturb(quiet, x, y, AttackConfig("pgd", eps, 0.0, 1, True))
    b = perturb(quiet, x, y, AttackConfig("pgd", eps, 0.0, 1, True))
    _check_in_ball(a, x, eps)
    inner = (x > eps) & (x < 1 - eps)
    d = (a - x)[inner]
    # uniform on [-eps, eps]: mean |d| = eps / 2, about half positive (n > 1000: loose bounds)
    assert abs(float(d.abs().mean()) - eps / 2) < 0.05 * eps
    assert 0.45 < float((d > 0).float().mean()) < 0.55
    assert not torch.equal(a, b)
    assert torch.equal(perturb(quiet, x, y, AttackConfig("pgd", eps, 0.0, 1, False)), x)


def test_pgd_ascends_the_cross_entropy_and_its_defaults(model_and_batch):
    """One PGD step without random start is eps * sign(grad of the summed cross-entropy) where the
    box does not clip it (as FGSM; CW ascends the margin instead); pgd's own defaults are a random
    start and cross-entropy."""
    _, x, y = model_and_batch
    eps = 0.03
    torch.manual_seed(0)
    quiet = build_model(8, 8, 3, 10, ensemble=1, noise=0.0).eval()
    x_ = x.clone().requires_grad_(True)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(quiet(x_), y, reduction="sum"), x_)
    inner = (x > eps) & (x < 1 - eps)
    stepped = perturb(quiet, x, y, AttackConfig("pgd", eps, eps, 1, False))
    assert torch.allclose((stepped - x)[inner], eps * g_ce.sign()[inner], atol=TOL)
    assert torch.equal(pgd(quiet, x, y, eps, eps, 1, False), stepped)  # loss "ce" by default
    start = pgd(quiet, x, y, eps, 0.0, 1)  # random start by default
    _check_in_ball(start, x, eps)
    assert float((start - x)[inner].abs().mean()) > eps / 4


def test_pgd_random_start_alone_stays_in_the_box(model_and_batch):
    """With no step PGD returns its random start, already clamped to [0, 1] (the batch has
    images saturated at 0 and 1)."""
    model, x, y = model_and_batch
    eps = 0.05
    torch.manual_seed(0)
    start = pgd(model, x, y, eps, eps, 0, random_start=True)
    _check_in_ball(start, x, eps)
    assert not torch.equal(start, x)


def test_pgd_leaves_inputs_the_model_does_not_read_alone(model_and_batch):
    """A zero input gradient means no step there (sign 0): without random start the channels the
    model ignores come back unchanged, the ones it reads move by the step."""
    _, x, y = model_and_batch
    eps = 0.03
    torch.manual_seed(0)
    quiet = build_model(8, 8, 3, 10, ensemble=1, noise=0.0).eval()

    def blind(z):  # reads channel 0 only
        return quiet(torch.cat([z[:, :1], torch.zeros_like(z[:, 1:])], 1))

    x_adv = perturb(blind, x, y, AttackConfig("pgd", eps, eps, 2, False))
    assert torch.equal(x_adv[:, 1:], x[:, 1:])
    assert float((x_adv - x)[:, :1].abs().max()) == pytest.approx(eps, abs=TOL)


def test_cw_uses_its_random_start(model_and_batch):
    _, x, y = model_and_batch
    eps = 0.05
    torch.manual_seed(0)
    quiet = build_model(8, 8, 3, 10, ensemble=1, noise=0.0).eval()
    start = perturb(quiet, x, y, AttackConfig("cw", eps, 0.0, 1, True))
    _check_in_ball(start, x, eps)
    inner = (x > eps) & (x < 1 - eps)
    assert abs(float((start - x)[inner].abs().mean()) - eps / 2) < 0.05 * eps
    assert torch.equal(perturb(quiet, x, y, AttackConfig("cw", eps, 0.0, 1, False)), x)


def test_any_nonzero_eps_attacks(model_and_batch):
    """Only eps = 0 returns the input unattacked; the largest ball (eps = 1) attacks too."""
    model, x, y = model_and_batch
    x_adv = perturb(model, x, y, AttackConfig("fgsm", 1.0, 0.0, 1, False))
    _check_in_ball(x_adv, x, 1.0)
    assert not torch.equal(x_adv, x)


def test_margin_loss():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, -1.0]])
    y = torch.tensor([0, 2])
    # sample 0: best other 2 - 3 = -1; sample 1: best other 5 - (-1) = 6
    assert float(margin_loss(logits, y)) == pytest.approx(5.0)


def test_attacks_with_eps_zero_return_the_input(model_and_batch):
    model, x, y = model_and_batch
    for kind in ("fgsm", "pgd", "cw", "trades"):
        assert torch.equal(perturb(model, x, y, AttackConfig(kind, 0.0, 0.01, 3, True)), x)


@pytest.fixture(scope="module")
def trained_float_run():
    """Natural training (alpha = 1, no training attack) of a small noisy net on 8x8 digits."""
    cfg = TrainConfig(dataset="digits", subset_train=600, subset_test=200, depth=8, width=8,
                      epochs=2, batch_size=32, loss="mix", alpha=1.0, seed=0)
    cfg.quant.bits = 32
    cfg.train_attack.eps = 0.0
    run = Run(cfg)
    for _ in range(cfg.epochs):
        run.train_epoch()
    return run


def test_pgd_is_stronger_than_fgsm_on_a_trained_model(trained_float_run):
    """PGD-10 with random start beats FGSM by a real margin, over several evaluation seeds (the
    model's noise is on, so each evaluation is one draw): at eps 0.1 FGSM leaves about 0.48 and
    PGD about 0.33 (seeds 0-3, idle machine). A PGD that runs one step, or whose steps do not
    add up, sits above FGSM and fails."""
    eps, n_seeds, margin = 0.1, 5, 0.05
    attacks = {"clean": None, "fgsm": AttackConfig("fgsm", eps, eps, 1, False),
               "pgd": AttackConfig("pgd", eps, eps / 4, 10, True)}
    accs = [trained_float_run.evaluate(seed=s, attacks=attacks) for s in range(n_seeds)]
    clean = sum(a["clean"] for a in accs) / n_seeds
    assert clean > 0.6, accs  # it learned: about 0.8 (chance 0.1)
    gaps = [a["fgsm"] - a["pgd"] for a in accs]
    # a draw where PGD is not `margin` below FGSM happens (p <= 0.1 per draw, assumed); more
    # such draws than a binomial allows at the 1 % level means PGD is not the stronger attack
    misses = sum(g < margin for g in gaps)
    assert misses <= allowed_failures(n_seeds, 0.1), gaps
    assert sum(gaps) / n_seeds >= 0.08, gaps
    assert max(a["pgd"] for a in accs) < clean - 0.2, accs


def test_seeded_evaluation_is_reproducible_and_noise_is_on(trained_float_run):
    """The same evaluation seed gives the same numbers; other seeds give other draws of the noise,
    so any claim about one model is a claim about a distribution (see the test above)."""
    clean = {"clean": None}
    a = trained_float_run.evaluate(seed=7, attacks=clean)
    assert trained_float_run.evaluate(seed=7, attacks=clean) == a
    draws = {trained_float_run.evaluate(seed=s, attacks=clean)["clean"] for s in range(4)}
    assert len(draws) > 1


def test_pgd_under_fp16_autocast_moves_the_pixels_fp32_moves():
    """PGD ascends the cross-entropy summed over the batch (EnResNet's loss). Under fp16
    autocast (`--precision fp16`, here on the CPU) the summed loss keeps the input gradients
    above fp16's underflow: one step moves all but about 0.005 % of the pixels (fp32: all). A
    mean over the batch divides every gradient by n and flushes 0.28 % of them to zero, pixels
    the attack then never moves; the bound sits between the two (seed 0, 256 images)."""
    torch.manual_seed(0)
    model = build_model(8, 8, 3, 10, ensemble=1, noise=0.0).eval()
    x, y = torch.rand(256, 3, 16, 16), torch.randint(0, 10, (256,))
    atk = AttackConfig("pgd", 0.03, 0.01, 1, False)
    assert bool((perturb(model, x, y, atk) != x).all())  # fp32: every pixel steps
    with autocast(torch.device("cpu"), "fp16"):
        assert torch.is_autocast_enabled("cpu")
        x_adv = perturb(model, x, y, atk)
    still = int((x_adv == x).sum())
    assert still <= 0.0005 * x.numel(), f"{still} of {x.numel()} pixels got no gradient under fp16"


def test_mix_loss_is_the_convex_combination(model_and_batch):
    _, x, y = model_and_batch
    torch.manual_seed(0)
    model = build_model(8, 8, 3, 10, ensemble=1, noise=0.0).eval()
    atk = AttackConfig("pgd", 0.05, 0.02, 3, True)
    # attack_bn="eval": with "train" (madry/mix's default) the attack's forwards move BatchNorm's
    # running statistics, so the second call would see another model
    torch.manual_seed(5)
    madry = tradeoff_loss(model, x, y, "madry", atk, attack_bn="eval")
    natural = F.cross_entropy(model(x), y)
    torch.manual_seed(5)
    mix = tradeoff_loss(model, x, y, "mix", atk, alpha=0.3, attack_bn="eval")
    assert mix.item() == pytest.approx(0.7 * madry.item() + 0.3 * natural.item(), rel=1e-5)
    torch.manual_seed(5)
    default = tradeoff_loss(model, x, y, "mix", atk, attack_bn="eval")  # alpha defaults to 0: madry
    assert default.item() == pytest.approx(madry.item(), rel=1e-6)
    assert madry.item() > natural.item()  # the attack raised the loss


@pytest.mark.parametrize("kind, attack_bn, updates", [
    ("madry", "eval", 1), ("madry", "train", 1 + 3), ("madry", "auto", 1 + 3),
    ("mix", "eval", 2), ("mix", "train", 2 + 3), ("mix", "auto", 2 + 3),
    ("trades", "eval", 2), ("trades", "train", 2 + 1 + 3),  # + the natural forward of the KL attack
    ("trades", "auto", 2),
    ("madry", None, 1 + 3), ("trades", None, 2),  # None: the default, "auto"
    ("mix-alpha0", "eval", 1),  # alpha = 0 runs no natural forward
])
def test_attack_bn_mode_decides_which_forwards_update_bn(kind, attack_bn, updates):
    """attack_bn=eval: only the loss forwards move the running BN statistics; train: the attack's
    forwards too (EnResNet). The loss always runs in the caller's (train) mode."""
    torch.manual_seed(0)
    model = build_model(8, 4, 3, 10, ensemble=1, noise=0.0).train()
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    bn = model.members[0].bn
    before = int(bn.num_batches_tracked)
    alpha = 0.0 if kind == "mix-alpha0" else 0.3
    kw = {} if attack_bn is None else {"attack_bn": attack_bn}
    loss = tradeoff_loss(model, x, y, kind.split("-")[0], AttackConfig("pgd", 0.03, 0.01, 3, True),
                         alpha=alpha, **kw)
    assert int(bn.num_batches_tracked) - before == updates
    assert model.training and loss.requires_grad


def _kl_sum(model, x, x_adv):
    """KL(p(x) || p(x_adv)) summed over the batch, written out: sum p (log p - log p_adv)."""
    with torch.no_grad():
        p = F.softmax(model(x), 1)
        return float((p * (torch.log(p) - F.log_softmax(model(x_adv), 1))).sum())


def test_trades_kl_attack_starts_near_x_and_ascends_the_kl(model_and_batch):
    """The TRADES attack starts at x + 0.001 N(0, 1) and takes sign steps up KL(p(x) || p(x')),
    p(x) fixed; through `perturb` it is the same attack."""
    _, x, y = model_and_batch
    eps = 0.03
    torch.manual_seed(0)
    quiet = build_model(8, 8, 3, 10, ensemble=1, noise=0.0).eval()
    inner = (x > eps) & (x < 1 - eps)
    torch.manual_seed(3)
    start = trades_kl(quiet, x, eps, 0.01, 0)
    torch.manual_seed(3)
    assert torch.equal(start, (x + 0.001 * torch.randn_like(x)).clamp(0, 1))
    d = (start - x)[inner]
    assert 0.0009 < float(d.std()) < 0.0011 and abs(float(d.mean())) < 1e-4
    assert float(start.min()) == 0.0 and float(start.max()) == 1.0  # saturated pixels: clamped
    torch.manual_seed(3)
    one = trades_kl(quiet, x, eps, eps, 1)
    x0 = start.clone().requires_grad_(True)
    p_nat = F.softmax(quiet(x), 1).detach()
    (g,) = torch.autograd.grad((p_nat * (torch.log(p_nat) - F.log_softmax(quiet(x0), 1))).sum(), x0)
    expected = torch.min(torch.max(start + eps * g.sign(), x - eps), x + eps).clamp(0, 1)
    assert torch.allclose(one, expected, atol=TOL)
    moved = (one - start).abs()
    assert bool((moved[inner & (g == 0)] == 0).all())  # no gradient, no step
    # a net blind to channels 1 and 2: the attack leaves them where they started
    blind = torch.nn.Sequential(torch.nn.Conv2d(1, 10, 16), torch.nn.Flatten())
    torch.manual_seed(3)
    start = trades_kl(lambda z: blind(z[:, :1]), x, eps, 0.0, 0)
    torch.manual_seed(3)
    stepped = trades_kl(lambda z: blind(z[:, :1]), x, eps, eps, 2)
    assert torch.equal(stepped[:, 1:], start[:, 1:])
    assert not torch.equal(stepped[:, :1], start[:, :1])
    torch.manual_seed(3)
    many = trades_kl(quiet, x, eps, eps / 4, 6)
    _check_in_ball(many, x, eps)
    assert _kl_sum(quiet, x, many) > 10 * _kl_sum(quiet, x, start)
    torch.manual_seed(3)
    assert torch.equal(perturb(quiet, x, y, AttackConfig("trades", eps, eps / 4, 6, True)), many)


def test_trades_loss_is_natural_ce_plus_beta_kl(model_and_batch):
    """trades: CE(f(x), y) + beta KL(p(x) || p(x_adv)) with x_adv from the KL attack (the TRADES
    objective; a reversed KL or a CE on x_adv fails here). In float64, so that each part is
    checked on its own: the KL term (about 7e-4 per image here) is 1e-3 of the total, and a
    tolerance on the total would let a wrong beta through."""
    _, x, y = model_and_batch
    torch.manual_seed(0)
    model = build_model(8, 8, 3, 10, ensemble=1, noise=0.0).eval().double()
    x = x.double()
    atk = AttackConfig("pgd", 0.05, 0.02, 3, True)
    torch.manual_seed(5)
    loss = tradeoff_loss(model, x, y, "trades", atk, beta=2.5)
    torch.manual_seed(5)
    x_adv = trades_kl(model, x, 0.05, 0.02, 3)
    kl = _kl_sum(model, x, x_adv) / len(x)
    assert kl > 1e-4
    natural = F.cross_entropy(model(x), y).item()
    assert loss.item() - natural == pytest.approx(2.5 * kl, rel=1e-9)
    assert loss.requires_grad
    torch.manual_seed(5)
    default = tradeoff_loss(model, x, y, "trades", atk)  # beta = 6, TRADES' default
    assert default.item() - natural == pytest.approx(6.0 * kl, rel=1e-9)
    torch.manual_seed(5)
    assert tradeoff_loss(model, x, y, "trades", atk, beta=0.0).item() == pytest.approx(natural, rel=1e-12)


def test_unknown_loss_and_attack_are_refused(model_and_batch):
    model, x, y = model_and_batch
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        tradeoff_loss(model, x, y, "nope", AttackConfig("pgd", 0.05, 0.02, 1, True))
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        perturb(model, x, y, AttackConfig("nope", 0.05, 0.02, 1, True))
