import json

import numpy as np
import torch

from models.train import augment_batch, load_checkpoint


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
    from models.train import TrainConfig, train

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
