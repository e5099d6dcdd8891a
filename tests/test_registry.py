import pytest
import torch

from convserve import models
from convserve.models._registry import register_model, task_of

# The registry's models by what they are trained for: each kind has its own forward contract.
CLASSIFIERS = [n for n in models.list_models() if task_of(n) == "classify"]
DETECTORS = [n for n in models.list_models() if task_of(n) == "detect"]
EMBEDDERS = [n for n in models.list_models() if task_of(n) == "embed"]


def test_registry_lists_every_family():
    assert {
        "lenet5", "alexnet", "vgg11", "vgg16", "resnet18", "resnet34", "resnet50", "resnet20",
        "googlenet", "inception_small", "efficientnet_lite0",
    } <= set(models.list_models())  # fmt: skip


def test_duplicate_registration_is_refused():
    def lenet5():  # same name as the registered builder
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="already registered"):
        register_model(lenet5)


def test_unknown_model_names_the_known_ones():
    with pytest.raises(KeyError, match="lenet5"):
        models.create_model("no-such-net")


@pytest.mark.parametrize("name", CLASSIFIERS)
@pytest.mark.parametrize(
    ("channels", "size"), [(1, 28), (3, 28), (1, 32), (3, 32), (1, 224), (3, 224)]
)
def test_forward_shape_and_finite(name: str, channels: int, size: int):
    torch.manual_seed(0)
    model = models.create_model(name, in_channels=channels, input_size=size, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(3, channels, size, size))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


def test_every_model_has_a_task_and_every_task_a_model():
    assert set(models.list_models()) == set(CLASSIFIERS) | set(DETECTORS) | set(EMBEDDERS)
    assert DETECTORS and EMBEDDERS


@pytest.mark.parametrize("name", DETECTORS)
@pytest.mark.parametrize("size", [96, 128])
def test_detectors_predict_every_cell_and_decode_to_boxes(name: str, size: int):
    torch.manual_seed(0)
    model = models.create_model(name, input_size=size, num_classes=7).eval()
    with torch.no_grad():
        raw = model(torch.randn(2, 1, size, size))
        boxes, scores = model.decode(raw)
    s, anchors = size // 16, len(model.anchors)
    assert raw.shape == (2, s, s, anchors, 5 + 7)  # one forward: every cell at once
    assert boxes.shape == (2, s * s * anchors, 4) and scores.shape == (2, s * s * anchors, 7)
    assert torch.isfinite(boxes).all() and ((scores >= 0) & (scores <= 1)).all()
    assert (boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all()


@pytest.mark.parametrize("name", EMBEDDERS)
def test_embedding_networks_give_unit_vectors(name: str):
    torch.manual_seed(0)
    model = models.create_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, model.dim)
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-5)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_features_and_head_compose_to_forward(name: str):
    model = models.create_model(name, in_channels=1, input_size=28, num_classes=10).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), model.forward_head(model.forward_features(x)))


def test_importing_models_does_not_import_torch(tmp_path):
    # The registry loads its families lazily; the spec and the service must not drag torch in.
    import subprocess
    import sys

    code = (
        "import sys, convserve.models, convserve.spec, convserve.service.app; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert out.stdout.strip() == "False"


# Published sizes at 224 px, 3 channels, 1000 classes.
PUBLISHED_PARAMETERS = {
    "alexnet": 61_100_840,  # single-stream form (torchvision's count)
    "vgg16": 138_357_544,
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "efficientnet_lite0": 4_652_008,  # the TensorFlow model garden's 4.7 M
}


@pytest.mark.parametrize(("name", "expected"), PUBLISHED_PARAMETERS.items())
def test_parameter_counts_match_the_published_ones(name: str, expected: int):
    model = models.create_model(name, in_channels=3, input_size=224, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_googlenet_has_about_6_6_million_parameters():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # torchvision's layout (3x3 in the "5x5" branch) is exactly its published 6,624,904;
    # the paper's true 5x5 branches add 0.38 M.
    assert count(models.create_model("googlenet", branch5_kernel=3)) == 6_624_904
    assert 6.9e6 < count(models.create_model("googlenet")) < 7.1e6


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_summary_works_for_every_model(name: str):
    from convserve.models.summary import format_table, summarize

    model = models.create_model(name, in_channels=1, input_size=28, num_classes=10)
    rows = summarize(model, 1, 28)
    total = sum(p.numel() for p in model.parameters())
    assert sum(r.params for r in rows) == total
    assert rows[-1].shape == (10,)
    assert str(total) in format_table(rows, total)
