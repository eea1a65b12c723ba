"""Reader for the IDX format of the original MNIST / Fashion-MNIST distribution.

An IDX file is: two zero bytes, a type byte (0x08 = unsigned byte), a byte giving
the number of dimensions, one big-endian uint32 per dimension, then the data.
Files may be gzipped (``.gz``) or not.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from vcl_jax.data.errors import DataError

_UBYTE = 0x08


def read_idx(path: str | os.PathLike, *, expected_ndim: int) -> np.ndarray:
    """Reads one IDX file of unsigned bytes.

    Args:
      path: the file, gzipped or not.
      expected_ndim: 3 for images ``[N, H, W]``, 1 for labels ``[N]``.

    Returns:
      A uint8 array of the file's shape.

    Raises:
      DataError: the file is missing, not IDX, of the wrong kind, or truncated.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"IDX file not found: {path}")
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot be read as {'gzip' if path.endswith('.gz') else 'a file'} "
                        f"({e}); the file is corrupt or truncated, download it again") from e
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX header "
                        "(4 bytes at least)")
    zero0, zero1, dtype, ndim = raw[0], raw[1], raw[2], raw[3]
    magic = int.from_bytes(raw[:4], "big")
    if zero0 != 0 or zero1 != 0 or dtype != _UBYTE or ndim != expected_ndim:
        expected = (_UBYTE << 8) | expected_ndim
        raise DataError(
            f"{path}: wrong IDX magic number {magic} (0x{magic:08x}); expected {expected} "
            f"(0x{expected:08x}: unsigned bytes, {expected_ndim} dimension(s)) — "
            f"is this the right file ({'images' if expected_ndim == 3 else 'labels'})?")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header: {len(raw)} bytes, expected at least {header}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims))
    have = len(raw) - header
    if have < size:
        raise DataError(f"{path}: truncated: header promises shape {dims} = {size} bytes of data, "
                        f"file holds {have}")
    if have > size:
        raise DataError(f"{path}: {have - size} unexpected trailing bytes after shape {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes a uint8 array as an IDX file (gzipped when the name ends in ``.gz``)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, _UBYTE, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
