import pytest
import torch

from convserve import models
from convserve.models._registry import register_model


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


@pytest.mark.parametrize("name", models.list_models())
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


@pytest.mark.parametrize("name", models.list_models())
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


@pytest.mark.parametrize("name", models.list_models())
def test_summary_works_for_every_model(name: str):
    from convserve.models.summary import format_table, summarize

    model = models.create_model(name, in_channels=1, input_size=28, num_classes=10)
    rows = summarize(model, 1, 28)
    total = sum(p.numel() for p in model.parameters())
    assert sum(r.params for r in rows) == total
    assert rows[-1].shape == (10,)
    assert str(total) in format_table(rows, total)
