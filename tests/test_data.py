import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from convserve.cli import main
from convserve.models.data import (
    DEFAULT_DATA_DIR,
    DatasetNotFoundError,
    load_fashion_mnist,
    read_idx,
)


def test_standard_splits(fashion_test):
    train = load_fashion_mnist("train")
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
    assert fashion_test.images.shape == (10000, 28, 28)
    for split in (train, fashion_test):
        assert split.labels.min() == 0 and split.labels.max() == 9
        assert np.bincount(split.labels).min() == len(split.labels) // 10  # balanced classes


def test_any_directory_with_the_four_files(tmp_path: Path, fashion_test):
    for f in DEFAULT_DATA_DIR.glob("*.gz"):
        shutil.copy(f, tmp_path / f.name)
    copy = load_fashion_mnist("test", tmp_path)
    assert np.array_equal(copy.images, fashion_test.images)


def test_missing_dataset_says_how_to_get_it(tmp_path: Path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)


def test_train_command_reports_missing_dataset(tmp_path: Path, capsys):
    assert main(["train", "--data-dir", str(tmp_path), "--epochs", "1"]) == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err


def test_read_idx_rejects_truncated_body(tmp_path: Path):
    header = bytes([0, 0, 0x08, 3]) + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    path = tmp_path / "bad-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header + b"\0" * 100))
    with pytest.raises(ValueError, match="header says"):
        read_idx(path)


def test_read_idx_rejects_non_idx(tmp_path: Path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(b"PK\x03\x04 not idx"))
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(path)
