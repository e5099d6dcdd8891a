"""convserve: CNN classifiers trained in PyTorch, served from ONNX Runtime by BentoML.

One import namespace: the core (`convserve.spec`, `.preprocess`, `.runtime`, `.store`,
`.errors`) lives here; `convserve.models`, `.export`, `.service` and `.loadtest` are the
repository's top-level folders, mapped into this package when it is installed.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("convserve")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
