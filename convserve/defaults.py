"""Names several parts of convserve share, kept in one place: the BentoML service's import
path and the models `make serve` (and the container) serve by default."""

from __future__ import annotations

# The BentoML service, by import path: found from any directory once convserve is installed.
SERVICE = "convserve.service.app:Classifier"

LENET = "fashion-lenet5"  # the default model: requests that name no model get its answers
IMAGENET = "imagenet-efficientnet-lite0"  # a real ImageNet classifier, for real photos
DETECTOR = "fashion-detector"
SIAMESE = "fashion-siamese"
STYLIZER = "styletransfer-multistyle26"

DEFAULT_TAG = f"{LENET}:latest"
DEFAULT_MODELS: tuple[str, ...] = (DEFAULT_TAG, f"{IMAGENET}:latest")
