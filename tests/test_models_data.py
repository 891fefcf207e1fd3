"""EnResNet models (algorithms.md section 2) and image-folder datasets."""

import math

import numpy as np
import torch
from torch import nn

from trainables.config import TrainConfig
from trainables.data import load_data
from trainables.loop import FINAL_KEYS, Hooks, train
from trainables.models import PreActResNet, build_model


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet20_parameter_count():
    member = PreActResNet(depth=20, width=16, in_channels=3, num_classes=10)
    assert _n_params(member) == 272_282
    conv3 = sum(m.weight.numel() for m in member.modules()
                if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    conv1 = sum(m.weight.numel() for m in member.modules()
                if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))
    assert (conv3, conv1) == (267_696, 2_560)  # 19 3x3 layers, 2 1x1 shortcuts
    en1 = build_model(20, 16, 3, 10, ensemble=1, noise=0.1)
    en2 = build_model(20, 16, 3, 10, ensemble=2, noise=0.1)
    assert _n_params(en1) == 272_282
    assert _n_params(en2) == 2 * 272_282


def test_noise_is_on_in_eval_mode():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    noisy = build_model(8, 8, 3, 10, ensemble=1, noise=0.1).eval()
    with torch.no_grad():
        a, b = noisy(x), noisy(x)
    assert not torch.allclose(a, b)
    quiet = build_model(8, 8, 3, 10, ensemble=1, noise=0.0).eval()
    with torch.no_grad():
        a, b = quiet(x), quiet(x)
    assert torch.equal(a, b)


def test_ensemble_averages_member_logits():
    torch.manual_seed(0)
    model = build_model(8, 8, 3, 10, ensemble=3, noise=0.0).eval()
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        members = torch.stack([m(x) for m in model.members])
        out = model(x)
    assert torch.allclose(out, members.mean(0), atol=1e-6)
    # the members really differ (independent initialisation), so the mean is not trivial
    assert not torch.allclose(members[0], members[1])
    # logits, not probabilities
    assert not torch.allclose(out.softmax(1), members.softmax(2).mean(0), atol=1e-4)


# ------------------------------------------------------------------------------------------
# folder: datasets


class _Keep(Hooks):
    def __init__(self):
        self.reports = []

    def report(self, metrics, checkpoint, final):
        self.reports.append((metrics, checkpoint, final))


CLASSES = ("bird", "cat", "dog", "fish")


def _write_tree(root, per_class=(6, 3)):
    """Four classes of noise images told apart by colour: one channel saturated (bird, cat, dog)
    or all dark (fish). An untrained network scores about chance (0.25) on them."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for ci, cls in enumerate(CLASSES):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                if ci < 3:
                    arr[..., ci] = 255  # the class signal
                else:
                    arr //= 4
                Image.fromarray(arr, "RGB").save(d / f"{i:03d}.png")


def _check_final(metrics, hooks, epochs=1):
    assert set(FINAL_KEYS) <= set(metrics)
    for k in ("clean_acc", "robust_acc", "fgsm_acc", "weight_sparsity", "channel_sparsity",
              "test_clean_acc", "test_robust_acc", "test_fgsm_acc"):
        assert 0.0 <= metrics[k] <= 1.0
    assert metrics["epoch"] == epochs
    assert len(hooks.reports) == epochs and [r[2] for r in hooks.reports] == [False] * (epochs - 1) + [True]


def test_folder_dataset_tiny_tree(tmp_path):
    _write_tree(tmp_path / "imgs", per_class=(16, 5))
    cfg = TrainConfig(dataset=f"folder:{tmp_path / 'imgs'}", epochs=3, depth=8, width=4,
                      batch_size=8, val_fraction=0.2, proxy_eval_size=8)
    cfg.eval_attack.steps = 2
    data = load_data(cfg)
    assert (data.in_channels, data.image_size, data.num_classes) == (3, 32, 4)
    assert len(data.train) + len(data.val) == 64 and len(data.test) == 20
    assert data.train.x.dtype == torch.uint8
    assert data.augment  # 32x32 colour images get crop + flip
    hooks = _Keep()
    metrics = train(cfg, hooks, data=data)
    _check_final(metrics, hooks, epochs=3)
    # it learned the colours: 0.85-1.0 (seeds 0, 1); an untrained network scores 0.25 here
    assert metrics["clean_acc"] >= 0.6, metrics["clean_acc"]
    assert hooks.reports[-1][0]["train_loss"] < hooks.reports[0][0]["train_loss"]
    q = hooks.reports[-1][1]["quantized_model"]
    assert q["members.0.conv1.weight"].shape == (4, 3, 3, 3)
    assert q["members.0.fc.weight"].shape == (4, 16)


def test_shared_cifar10_folder(cifar10_folder):
    cfg = TrainConfig(dataset=f"folder:{cifar10_folder}", subset_train=300, subset_test=100,
                      epochs=1, depth=8, width=8)
    data = load_data(cfg)
    assert (data.in_channels, data.image_size, data.num_classes) == (3, 32, 10)
    assert len(data.train) + len(data.val) == 300 and len(data.test) == 100
    # the decoded subset is real image data, not the zero placeholder of undecoded files
    assert data.train.x.float().std() > 20 and data.test.x.float().mean() > 50
    hooks = _Keep()
    metrics = train(cfg, hooks, data=data)
    _check_final(metrics, hooks)
    q = hooks.reports[0][1]["quantized_model"]
    assert q["members.0.conv1.weight"].shape == (8, 3, 3, 3)
    assert q["members.0.fc.weight"].shape == (10, 32)
    assert math.isfinite(metrics["size_bits"]) and metrics["compression"] > 1


def test_unpack_archive_once_and_again_when_the_archive_changes(tmp_path):
    import tarfile

    from trainables.data import unpack_archive

    src = tmp_path / "src"
    (src / "train" / "a").mkdir(parents=True)
    (src / "train" / "a" / "0.txt").write_text("x")
    archive = tmp_path / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "train", arcname="train")
    cache = tmp_path / "cache"
    dest = unpack_archive(archive, cache, name="tree")
    assert (dest / "train" / "a" / "0.txt").read_text() == "x"
    (dest / "train" / "a" / "mine").write_text("kept")  # a second call reuses the copy
    assert unpack_archive(archive, cache, name="tree") == dest and (dest / "train/a/mine").exists()
    (src / "train" / "a" / "1.txt").write_text("y" * 1000)
    with tarfile.open(archive, "w:gz") as tar:  # a different archive: unpacked afresh
        tar.add(src / "train", arcname="train")
    unpack_archive(archive, cache, name="tree")
    assert (dest / "train/a/1.txt").exists() and not (dest / "train/a/mine").exists()
    assert [p.name for p in cache.iterdir()] == ["tree"]  # no temporary folder left behind
