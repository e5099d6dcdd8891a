"""convserve: CNN classifiers trained in PyTorch, served from ONNX Runtime by BentoML."""
