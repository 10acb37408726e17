"""A small reader for the IDX format used by MNIST and Fashion-MNIST.

Layout (big-endian): two zero bytes, one type-code byte, one byte with the number of
dimensions ``d``, then ``d`` unsigned 32-bit sizes, then the data in C order.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

__all__ = ["IDXFormatError", "read_idx", "write_idx"]

# Type code -> big-endian numpy dtype, as in the format's specification.
_IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
_DTYPE_CODES: dict[str, int] = {np.dtype(v).newbyteorder("=").str: k for k, v in _IDX_DTYPES.items()}


class IDXFormatError(ValueError):
    """An IDX file is corrupt, truncated or not of the expected shape."""


def _read_bytes(path: str) -> bytes:
    """Whole file contents, transparently gunzipped when the name ends in ``.gz``."""
    if path.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError, zlib.error) as e:
            # gzip raises BadGzipFile (an OSError) or EOFError on damaged archives.
            raise IDXFormatError(f"{path}: cannot decompress ({e}); the file is corrupt or truncated") from e
    with open(path, "rb") as f:
        return f.read()


def read_idx(path: str | os.PathLike[str], ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (optionally ``.gz``) into a numpy array in native byte order.

    Args:
        path: the file; a name ending in ``.gz`` is decompressed.
        ndim: the expected number of dimensions (3 for images, 1 for labels), or None to accept any.

    Returns:
        An array of shape given by the header (e.g. ``(N, 28, 28)`` uint8 images).

    Raises:
        IDXFormatError: bad magic number, unknown type code, wrong ``ndim``, or a data
            size that does not match the header (truncated or padded file).
    """
    path = os.fspath(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise IDXFormatError(f"{path}: only {len(raw)} bytes, too short for an IDX header")
    zero0, zero1, code, nd = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES:
        raise IDXFormatError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} "
            "(expected 0x0000 followed by a type code 08/09/0B/0C/0D/0E and a dimension count)"
        )
    if ndim is not None and nd != ndim:
        raise IDXFormatError(f"{path}: has {nd} dimensions, expected {ndim}")
    header_len = 4 + 4 * nd
    if len(raw) < header_len:
        raise IDXFormatError(f"{path}: truncated header ({len(raw)} bytes, need {header_len})")
    shape = struct.unpack(f">{nd}I", raw[4:header_len])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header_len
    if got != expected:
        kind = "truncated" if got < expected else "has trailing bytes"
        raise IDXFormatError(
            f"{path}: {kind}: header says shape {tuple(shape)} ({expected} data bytes) but the file holds {got}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
    # Native byte order and a writable copy, so torch.from_numpy accepts it.
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzipped when the name ends in ``.gz``); used by tests and tools."""
    path = os.fspath(path)
    arr = np.ascontiguousarray(array)
    code = _DTYPE_CODES.get(arr.dtype.newbyteorder("=").str)
    if code is None:
        raise TypeError(f"IDX cannot store dtype {arr.dtype}")
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + arr.astype(_IDX_DTYPES[code]).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)
