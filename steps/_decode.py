"""numba kernels turning big-endian FITS pixels into native arrays in one pass.

numpy's byteswapping casts take two passes and several times the time of a memory copy; these
loops swap, offset and convert each value once. Inputs are (planes, rows, cols) views of a
memory-mapped file with any strides (column windows included); outputs are C-contiguous arrays of
the same shape. Used by :mod:`.fitsio` for large blocks.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def be_u16_offset_to_f32(raw: np.ndarray, out: np.ndarray) -> None:
    """BITPIX=16 with BZERO=32768 (stored as big-endian int16): raw uint16 bytes -> float32."""
    for p in range(raw.shape[0]):
        for r in range(raw.shape[1]):
            src = raw[p, r]
            dst = out[p, r]
            for c in range(src.size):
                v = src[c]
                dst[c] = np.float32(((v >> 8) | ((v & 0xFF) << 8)) ^ 0x8000)


@numba.njit(cache=True, nogil=True)
def be_u32_to_u32(raw: np.ndarray, out: np.ndarray, flip: np.uint32) -> None:
    """Byte-swap 32-bit words into native order, then XOR ``flip``: 0 for float32/int32 bit
    patterns, 2**31 for unsigned 32-bit stored as int32 with BZERO=2**31."""
    for p in range(raw.shape[0]):
        for r in range(raw.shape[1]):
            src = raw[p, r]
            dst = out[p, r]
            for c in range(src.size):
                v = src[c]
                dst[c] = (((v >> 24) & 0xFF) | ((v >> 8) & 0xFF00) | ((v << 8) & 0xFF0000)
                          | ((v << 24) & 0xFF000000)) ^ flip


@numba.njit(cache=True, nogil=True)
def translate_bytes(dq: np.ndarray, tables: np.ndarray, out: np.ndarray) -> None:
    """out = OR over bytes k of tables[k, byte_k(dq)]: file DQ bits -> pipeline bits (flat arrays)."""
    for i in range(dq.size):
        v = dq[i]
        if v == 0:
            out[i] = 0
        else:
            out[i] = (tables[0, v & 0xFF] | tables[1, (v >> 8) & 0xFF] | tables[2, (v >> 16) & 0xFF]
                      | tables[3, (v >> 24) & 0xFF])
