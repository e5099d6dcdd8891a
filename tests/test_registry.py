import pytest
import torch

import models
from models._registry import register_model


def test_registry_lists_lenet5():
    assert "lenet5" in models.list_models()


def test_duplicate_registration_is_refused():
    def lenet5():  # same name as the registered builder
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="already registered"):
        register_model(lenet5)


def test_unknown_model_names_the_known_ones():
    with pytest.raises(KeyError, match="lenet5"):
        models.create_model("no-such-net")


@pytest.mark.parametrize("name", models.list_models())
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_forward_shape_and_finite(name: str, channels: int, size: int):
    torch.manual_seed(0)
    model = models.create_model(name, in_channels=channels, input_size=size, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(3, channels, size, size))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", models.list_models())
def test_features_and_head_compose_to_forward(name: str):
    model = models.create_model(name).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), model.forward_head(model.forward_features(x)))


def test_importing_models_does_not_import_torch():
    # The service imports models.spec; that must not drag torch into the serving process.
    import subprocess
    import sys

    code = "import sys, models, models.spec; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
