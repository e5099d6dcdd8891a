"""ONNX export, verification and the model store."""
