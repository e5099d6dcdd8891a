"""Preprocessed tensors from clients: `.npy` or raw bytes with shape and dtype, checked strictly.

Layout is the model's own (N x C x H x W, or N x H x W x C for an NHWC model), channels in its
order. float32 is taken as already normalized; uint8 is taken as pixels (0..255) and
normalized with the model's mean and std, as images are (or passed as they are to a model
that takes pixels).
"""

from __future__ import annotations

import io
import math

import numpy as np

from convserve.errors import ErrorCode, InvalidInput
from convserve.preprocess import model_input
from convserve.spec import InputSpec

NPY_MAGIC = b"\x93NUMPY"
DTYPES = {"float32": np.dtype("<f4"), "uint8": np.dtype("u1")}


def _invalid(message: str) -> InvalidInput:
    return InvalidInput(ErrorCode.INVALID_TENSOR, message)


def parse_dtype(name: str) -> np.dtype:
    dtype = DTYPES.get(name.lower())
    if dtype is None:
        raise _invalid(f"dtype {name!r} is not accepted; use float32 or uint8")
    return dtype


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise _invalid(f"shape {text[:40]!r} must be comma-separated integers") from None
    if any(d < 0 for d in shape):
        raise _invalid("shape must not have negative dimensions")
    return shape


def read_npy(data: bytes) -> np.ndarray:
    """A .npy body, header checked before any data is interpreted; never unpickles."""
    stream = io.BytesIO(data)
    try:
        major, _minor = np.lib.format.read_magic(stream)
        if major == 1:
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif major in (2, 3):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError("unknown .npy version")
    except Exception:  # noqa: BLE001 - numpy parses the header with ast: ValueError, SyntaxError,
        # tokenize.TokenError (found by tests/test_fuzz.py), ...; all mean "not a .npy array"
        raise _invalid("the body is not a valid .npy array") from None
    if dtype.hasobject or dtype.str not in {d.str for d in DTYPES.values()} | {">f4"}:
        raise _invalid(f"dtype {dtype} is not accepted; use float32 or uint8")
    return _from_bytes(data[stream.tell() :], shape, dtype, fortran=fortran)


def read_raw(data: bytes, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return _from_bytes(data, shape, dtype, fortran=False)


def _from_bytes(
    payload: bytes, shape: tuple[int, ...], dtype: np.dtype, *, fortran: bool
) -> np.ndarray:
    expected = math.prod(shape) * dtype.itemsize
    if len(payload) != expected:
        raise _invalid(
            f"shape {list(shape)} of {dtype.name} needs {expected} bytes; got {len(payload)}"
        )
    array = np.frombuffer(payload, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    # Byte order is a wire detail, not a value change.
    return array.astype(dtype.newbyteorder("="), copy=False)


def to_model_input(array: np.ndarray, spec: InputSpec, max_images: int) -> np.ndarray:
    """Checked input batch for the model: `InvalidInput` on any mismatch, NaN or infinity."""
    expected = spec.shape(-1)[1:]
    if array.ndim != 4 or tuple(array.shape[1:]) != expected:
        raise _invalid(
            f"shape {list(array.shape)} does not match the model's input "
            f"[N, {', '.join(map(str, expected))}]"
        )
    n = array.shape[0]
    if n < 1:
        raise _invalid("the batch is empty")
    if n > max_images:
        raise InvalidInput(
            ErrorCode.TOO_MANY_IMAGES, f"{n} images sent; at most {max_images} per request"
        )
    if array.dtype == np.uint8:
        nchw = array.transpose(0, 3, 1, 2) if spec.layout == "nhwc" else array
        return model_input(nchw, spec)
    if spec.dtype == "uint8":
        raise _invalid("this model takes pixels: send uint8")
    if not np.isfinite(array).all():
        raise _invalid("the tensor holds NaN or infinite values")
    return np.ascontiguousarray(array, dtype=np.float32)
