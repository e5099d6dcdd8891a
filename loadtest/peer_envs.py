"""Virtual environments for the peers whose dependencies cannot live beside convserve's, made on
first use under .cache/peers/ (the packages come from PyPI, like any dependency):

  triton      Debian's own Python 3 (the stub Triton starts for a Python model links Debian's
              libpython, which must match the interpreter's standard library) with
              nvidia-pytriton 0.7, which ships Triton's server
  torchserve  TorchServe 0.12 and its model archiver, the CPU build of torch; its frontend needs
              a Java 17 runtime (Debian's openjdk-17-jre-headless, which `make bench` installs)
  rayserve    Ray Serve, which pins its own web stack
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from convserve.loadtest.processes import ROOT

CACHE = ROOT / ".cache" / "peers"
COMMON = ["onnxruntime==1.32.0", "pillow", "numpy"]


@dataclass(frozen=True)
class Env:
    python: str  # the interpreter the environment is made from
    packages: tuple[str, ...]
    needs: tuple[str, ...] = ()  # commands that must be on PATH


# The interpreter under this venv (peers get venvs of their own, never this one).
BASE_PYTHON: str = getattr(sys, "_base_executable", sys.executable)

ENVS = {
    "triton": Env("/usr/bin/python3", ("nvidia-pytriton==0.7.0", *COMMON)),
    "torchserve": Env(
        BASE_PYTHON,  # the Python convserve runs on: the local CPU torch wheel fits it
        ("torch==2.13.0", "torchserve==0.12.0", "torch-model-archiver==0.12.0", "pyyaml", *COMMON),
        needs=("java",),
    ),
    # python-multipart: Starlette parses the upload form with it, and Ray Serve does not pull it in.
    "rayserve": Env(BASE_PYTHON, ("ray[serve]==2.60.0", "python-multipart", *COMMON)),
}


class Unavailable(Exception):
    """The peer cannot run on this machine; the message says what failed."""


def ensure(name: str) -> str:
    """The peer's Python interpreter, its environment made first if it is not there yet."""
    env = ENVS[name]
    folder = CACHE / name
    python = folder / "bin" / "python"
    done = folder / ".installed"
    missing = [cmd for cmd in env.needs if shutil.which(cmd) is None]
    if missing:
        raise Unavailable(f"{', '.join(missing)} is not installed")
    if done.exists():
        return str(python)
    if not Path(env.python).exists():
        raise Unavailable(f"{env.python} is not installed")
    print(f"making the {name} peer's environment in {folder} (once)", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    steps = [
        [env.python, "-m", "venv", str(folder)],
        [str(python), "-m", "pip", "install", "--quiet", *env.packages],
    ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["?"]
            raise Unavailable(f"`{' '.join(step[:4])} ...` failed: {tail[0][:300]}")
    done.touch()
    return str(python)
