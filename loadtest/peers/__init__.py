"""Peer servers for the benchmark: the code users write, or the server they would pick,
configured as its documentation recommends, on the same model and the same load as convserve.

Each peer is a standalone program that imports nothing of convserve: it reads the model file
and the recipe's numbers (size, mean, std, labels) from the environment the harness sets
(PEER_ONNX, PEER_TORCHSCRIPT, PEER_SPEC: the spec.json the model was stored with, read as plain
JSON) and decodes, preprocesses and answers the way its own documentation shows. So the
peers repeat each other on purpose: each is what one user would write for one stack.
The one exception is `fastapi_ort`, which calls convserve's own preprocessing, kept to show what
that preprocessing (format sniffing, limits, EXIF, compositing) costs on the same stack.
"""
