import json

import numpy as np
import torch

from convserve.models.augment import augment_batch
from convserve.models.checkpoint import load_checkpoint


def test_short_run_loss_falls_and_writes_its_outputs(quick_run):
    history = quick_run.metrics["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_loss"] < history[0]["test_loss"]
    out = quick_run.checkpoint.parent
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["best_test_accuracy"] == max(h["test_accuracy"] for h in history)
    for png in ("curves.png", "confusion.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_rebuilds_the_model_alone(quick_run):
    model, spec = load_checkpoint(quick_run.checkpoint)
    assert spec.architecture == "lenet5" and len(spec.labels) == 10
    assert spec.input.channels == 1 and (spec.input.height, spec.input.width) == (28, 28)
    assert spec.metrics["test_accuracy"] == quick_run.metrics["best_test_accuracy"]
    state = torch.load(quick_run.checkpoint, weights_only=True)["state_dict"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name])


def test_augmentation_is_a_shift_or_mirror_of_each_image():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 1, 28, 28)
    out = augment_batch(x, g, fill=-1.0, pad=2)
    assert out.shape == x.shape
    for original, augmented in zip(x, out, strict=True):
        candidates = []
        padded = torch.nn.functional.pad(original, (2, 2, 2, 2), value=-1.0)
        for dy in range(5):
            for dx in range(5):
                crop = padded[:, dy : dy + 28, dx : dx + 28]
                candidates += [crop, crop.flip(-1)]
        assert any(torch.equal(augmented, c) for c in candidates)


def test_seeded_training_is_reproducible(tmp_path):
    from convserve.models.train import TrainConfig, train

    runs = [
        train(
            TrainConfig(
                epochs=1, train_limit=512, test_limit=256, out_dir=str(tmp_path / d), progress=False
            )
        )
        for d in ("a", "b")
    ]
    a, b = (r.metrics["history"][0] for r in runs)
    assert a["train_loss"] == b["train_loss"] and a["test_accuracy"] == b["test_accuracy"]
    assert np.isfinite(a["train_loss"])


def _config(tmp_path, **kw):
    from convserve.models.train import TrainConfig

    base = {"epochs": 1, "train_limit": 1000, "test_limit": 300, "progress": False}
    return TrainConfig(out_dir=str(tmp_path), **{**base, **kw})


def test_channels_last_training_computes_the_same_model_as_nchw(tmp_path):
    # NHWC is a layout choice for speed only: the same seeded run in either layout must end
    # with the same weights, up to float rounding in the convolution kernels.
    from convserve.models.train import train

    states = []
    for layout, channels_last in (("nhwc", True), ("nchw", False)):
        run = train(_config(tmp_path / layout, train_limit=512, channels_last=channels_last))
        states.append(torch.load(run.checkpoint, weights_only=True)["state_dict"])
    nhwc, nchw = states
    assert nhwc.keys() == nchw.keys()
    for name in nhwc:
        torch.testing.assert_close(nhwc[name], nchw[name], rtol=1e-4, atol=1e-5)


def test_resume_continues_exactly_where_the_run_stopped(tmp_path):
    from convserve.models.train import train

    straight = train(_config(tmp_path / "straight", epochs=2))
    train(_config(tmp_path / "split", epochs=2, stop_after=1))  # as if the job were stopped
    # The same 2-epoch run, stopped after epoch 1 and resumed: schedule and RNG streams too.
    resumed = train(
        _config(tmp_path / "split", epochs=2, resume=str(tmp_path / "split" / "last.pt"))
    )

    def without_time(history):
        return [{k: v for k, v in h.items() if k != "elapsed_s"} for h in history]

    assert without_time(resumed.metrics["history"]) == without_time(straight.metrics["history"])
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(resumed.metrics["history"]) == 2


def test_sgd_cosine_label_smoothing_and_random_erasing(tmp_path):
    from convserve.models.train import train

    result = train(
        _config(
            tmp_path, model="resnet20", optimizer="sgd", lr=0.05, schedule="cosine",
            label_smoothing=0.1, random_erasing=0.5, epochs=2,
        )
    )  # fmt: skip
    history = result.metrics["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert result.metrics["best_test_accuracy"] > 0.3


def test_random_erasing_erases_rectangles_at_its_rate():
    from convserve.models.augment import random_erase

    x = torch.ones(2000, 1, 28, 28)
    gen = torch.Generator().manual_seed(0)
    out = random_erase(x, gen, p=0.5, fill=-1.0)
    erased = (out == -1.0).flatten(1).sum(1).float()
    rate = (erased > 0).float().mean().item()
    assert 0.45 < rate < 0.55
    fraction = erased[erased > 0] / (28 * 28)
    assert fraction.min() > 0.005 and fraction.max() < 0.3
    assert torch.equal(random_erase(x, gen, p=0.0, fill=-1.0), x)


def test_folder_per_class_dataset(tmp_path, fashion_test):
    from PIL import Image

    from convserve.models.train import train

    root = tmp_path / "data"
    classes = {0: "shirts", 1: "trousers", 9: "boots"}
    for split, start in (("train", 0), ("test", 2000)):
        for label, name in classes.items():
            picks = np.flatnonzero(fashion_test.labels[start:] == label)[:30] + start
            (root / split / name).mkdir(parents=True)
            for i in picks:  # colour JPEGs at another size: resized and converted by the loader
                Image.fromarray(fashion_test.images[i]).convert("RGB").resize((40, 40)).save(
                    root / split / name / f"{i}.jpg"
                )
    result = train(
        _config(tmp_path / "run", dataset=str(root), epochs=12, model_kwargs={"in_channels": 3})
    )
    _, spec = load_checkpoint(result.checkpoint)
    assert spec.labels == ("boots", "shirts", "trousers")
    assert spec.input.channels == 3 and len(spec.input.mean) == 3
    assert result.metrics["train_images"] == 90 and result.metrics["best_test_accuracy"] > 0.5


def test_transfer_learning_with_a_frozen_backbone(tmp_path, quick_run):
    from convserve.models.train import train

    result = train(
        _config(
            tmp_path, dataset="digits", hflip=False, epochs=5, lr=1e-2, train_limit=None,
            test_limit=None, init_from=str(quick_run.checkpoint), freeze_backbone=True,
        )
    )  # fmt: skip
    source = torch.load(quick_run.checkpoint, weights_only=True)["state_dict"]
    model, spec = load_checkpoint(result.checkpoint)
    assert spec.labels == tuple(str(d) for d in range(10))
    tuned = model.state_dict()
    # The backbone is the Fashion-MNIST one, untouched; only the new head learned digits.
    for name in ("conv1.weight", "conv2.weight", "fc3.weight"):
        assert torch.equal(tuned[name], source[name])
    assert not torch.equal(tuned["head.weight"], source["head.weight"])
    assert result.metrics["best_test_accuracy"] > 0.5


def test_two_process_distributed_training_ends_with_identical_weights(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--standalone", "-m", "convserve", "train", "lenet5", "--epochs", "1",
        "--train-limit", "2000", "--test-limit", "500", "--threads", "1", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    digests = metrics["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert (out / "best.pt").exists()


def test_transfer_from_imagenet_trains_a_new_head_on_a_frozen_backbone(tmp_path):
    """The course's transfer learning: EfficientNet-Lite0's ImageNet features, frozen, and a new
    10-class head trained on 5 Fashion-MNIST images per class (upscaled, replicated to RGB)."""
    from convserve.models.pretrained import pretrained_model
    from convserve.models.train import train

    result = train(
        _config(tmp_path, model="efficientnet_lite0", init_from="imagenet", freeze_backbone=True,
                per_class=5, train_limit=None, test_limit=200, batch_size=10, lr=3e-3, epochs=2,
                model_kwargs={"input_size": 32}, hflip=False)
    )  # fmt: skip
    imagenet, _ = pretrained_model("efficientnet_lite0", "imagenet")
    model, spec = load_checkpoint(result.checkpoint)
    assert result.metrics["train_images"] == 50  # 5 of each of the 10 classes
    assert spec.input.channels == 3 and spec.input.height == 32
    assert spec.input.mean == (0.5, 0.5, 0.5)  # the backbone's own normalization
    source, tuned = imagenet.state_dict(), model.state_dict()
    for name in ("stem.1.weight", "blocks.7.depthwise.1.weight", "head.1.weight"):
        assert torch.equal(tuned[name], source[name]), name
    # Frozen batch norms keep ImageNet's statistics (eval mode while the head trains).
    assert torch.equal(tuned["blocks.3.project.2.running_mean"],
                       source["blocks.3.project.2.running_mean"])  # fmt: skip
    assert tuned["fc.weight"].shape == (10, 1280)
    assert result.metrics["best_test_accuracy"] > 0.2  # chance is 0.1


def test_evaluating_a_subset_without_the_last_class_sizes_the_matrix_by_the_model():
    from convserve.models import create_model
    from convserve.models.objectives import evaluate

    model = create_model("lenet5", num_classes=10)
    x, y = torch.randn(20, 1, 28, 28), torch.arange(20) % 9  # class 9 never appears
    _, _, confusion = evaluate(model, x, y)
    assert confusion.shape == (10, 10) and confusion.sum() == 20


def test_the_train_summary_line_needs_no_summary_figure():
    from convserve.cli import train_summary

    figure = {"best_test_accuracy": 0.9074, "best_epoch": 3, "train_time_s": 113.2}
    assert train_summary(figure, "runs/x/best.pt") == (
        "test accuracy 90.74% (best, epoch 3) in 113 s; checkpoint runs/x/best.pt"
    )
    assert train_summary({"best_epoch": 2, "train_time_s": 5.0}, "b.pt") == (
        "in 5 s; checkpoint b.pt"
    )
