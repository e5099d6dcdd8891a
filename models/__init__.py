"""CNN architectures, Fashion-MNIST data and training for convserve."""

from convserve.models._registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
