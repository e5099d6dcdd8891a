"""Start TorchServe 0.12 for the benchmark, as its documentation shows: archive the TorchScript
model with its handler and model-config.yaml (torch-model-archiver), then `torchserve --start
--foreground` on the archive, one worker, token authorization off (a local benchmark).

    PEER_TORCHSCRIPT=model.pt PEER_SPEC=spec.json python loadtest/peers/torchserve/serve.py PORT
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def main() -> None:
    port = int(sys.argv[1])
    work = Path(tempfile.mkdtemp(prefix="torchserve-"))
    store = work / "model-store"
    store.mkdir()
    subprocess.run(
        [
            str(BIN / "torch-model-archiver"),
            "--model-name",
            "lenet5",
            "--version",
            "1.0",
            "--serialized-file",
            os.environ["PEER_TORCHSCRIPT"],
            "--handler",
            str(HERE / "handler.py"),
            "--config-file",
            str(HERE / "model-config.yaml"),
            "--export-path",
            str(store),
        ],
        check=True,
    )
    config = (
        (HERE / "config.properties")
        .read_text()
        .format(port=port, management_port=port + 1, metrics_port=port + 2)
    )
    (work / "config.properties").write_text(config)
    # TorchServe writes its logs/ (hundreds of MB in a benchmark) into its working directory:
    # the run's temporary folder, never the checkout it was started from.
    os.chdir(work)
    os.execv(
        str(BIN / "torchserve"),
        [
            str(BIN / "torchserve"),
            "--start",
            "--foreground",
            "--ncs",
            "--model-store",
            str(store),
            "--models",
            "lenet5=lenet5.mar",
            "--ts-config",
            str(work / "config.properties"),
            "--disable-token-auth",
        ],
    )


if __name__ == "__main__":
    main()
