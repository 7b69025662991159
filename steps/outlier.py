"""Outlier detection for imaging: jwst's ``outlier_detection`` (imaging mode, with resampling).

1. each exposure group is drizzled alone onto the common grid (:func:`single_drizzle`); pixels whose
   weight is below ``maskpt`` x the (3-sigma clipped) mean weight become NaN;
2. the median of those images, pixel by pixel (:class:`MedianStack`: the single-drizzled images
   live in a temporary file and the median is taken in row blocks, so RAM holds one block, not
   the stack);
3. the median is blotted back to every exposure (:func:`calstream.steps.resample.blot`) and pixels
   are flagged (:func:`flag_outliers`) where ``|data - blot - sky| > scale1 |d blot| + snr1 err``
   after a 3x3 growth, and ``> scale2 |d blot| + snr2 err``; flagged pixels get DQ
   ``OUTLIER | DO_NOT_USE`` and NaN in SCI/ERR/VAR_*.

``|d blot|`` is the largest absolute difference between a blot pixel and its 4 neighbours
(stcal's ``_abs_deriv``). Flagging runs in row blocks with a two-row halo, identical to a
whole-frame evaluation. Arrays are float32 (ny, nx); DQ uint32.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from . import dqflags
from .resample import MosaicAccumulator, OutputGrid, ResampleInput

_FLAG = np.uint32(int(dqflags.DO_NOT_USE) | int(dqflags.OUTLIER))
#: bytes of the (n, rows, nx) block read at a time when taking the median
MEDIAN_BLOCK_BYTES = 32 << 20
FLAG_BLOCK_ROWS = 256


def weight_threshold(wht: np.ndarray, maskpt: float) -> float:
    """``maskpt`` x the mean of the non-zero finite weights after 3-sigma clipping (5 iterations)."""
    from astropy.stats import sigma_clip  # noqa: PLC0415

    values = wht[np.isfinite(wht) & (wht != 0)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
        warnings.filterwarnings("ignore", "invalid value", RuntimeWarning)
        return float(np.mean(sigma_clip(values, sigma=3, maxiters=5, masked=False, copy=False), dtype="f8") * maskpt)


def single_drizzle(images: Iterable[tuple[ResampleInput, np.ndarray | None]], grid: OutputGrid, *, n_inputs: int,
                   pixfrac: float = 1.0, kernel: str = "square", fillval: str | float = "NAN",
                   weight_type: str | None = "ivm", good_bits: int | str | None = "~DO_NOT_USE"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(SCI, WHT) of one exposure group drizzled alone (no context, no variances).

    ``images`` yields (input, pixel map or None) pairs, one exposure at a time.
    """
    acc = MosaicAccumulator(grid, n_inputs=n_inputs, pixfrac=pixfrac, kernel=kernel, fillval=fillval,
                            weight_type=weight_type, good_bits=good_bits, enable_ctx=False, enable_var=False,
                            compute_err=None)
    for image, pixmap in images:
        acc.add(image, pixmap)
    mosaic = acc.finalize()
    return mosaic.sci, mosaic.wht


def mask_low_weight(sci: np.ndarray, wht: np.ndarray, maskpt: float) -> np.ndarray:
    """``sci`` with NaN where ``wht`` is below :func:`weight_threshold` (in place; returned)."""
    sci[wht < weight_threshold(wht, maskpt)] = np.nan
    return sci


class MedianStack:
    """float32 images of one shape kept in a temporary file; their median taken by row blocks.

    Images are written and blocks read with positioned I/O (no memory mapping, so the resident
    set holds one block, not the stack). Use as a context manager (the file is deleted on exit).
    ``directory`` is where the temporary file goes (default: the system temporary folder).
    """

    def __init__(self, n: int, shape: tuple[int, int], directory: str | Path | None = None,
                 block_bytes: int = MEDIAN_BLOCK_BYTES) -> None:
        if n < 1:
            raise ValueError("a median needs at least one image")
        self.n, self.shape, self.block_bytes = n, (int(shape[0]), int(shape[1])), block_bytes
        self._file = tempfile.TemporaryFile(prefix=".calstream-median-", dir=directory)
        self._image_bytes = self.shape[0] * self.shape[1] * 4

    def __enter__(self) -> "MedianStack":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def set(self, index: int, image: np.ndarray) -> None:
        """Store image ``index`` ((ny, nx), written as float32)."""
        data = np.ascontiguousarray(image, dtype=np.float32)
        if data.shape != self.shape:
            raise ValueError(f"image shape {data.shape} differs from the stack's {self.shape}")
        os.pwrite(self._file.fileno(), data.tobytes(), index * self._image_bytes)

    def _rows(self, index: int, start: int, stop: int) -> np.ndarray:
        nx = self.shape[1]
        raw = os.pread(self._file.fileno(), (stop - start) * nx * 4, index * self._image_bytes + start * nx * 4)
        return np.frombuffer(raw, dtype=np.float32).reshape(stop - start, nx)

    def median(self) -> np.ndarray:
        """float32 (ny, nx) NaN-ignoring median over the stack (NaN where every image is NaN)."""
        ny, nx = self.shape
        out = np.empty(self.shape, np.float32)
        rows = max(1, self.block_bytes // max(1, self.n * nx * 4))
        block = np.empty((self.n, rows, nx), np.float32)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "All-NaN slice encountered", RuntimeWarning)
            for start in range(0, ny, rows):
                stop = min(ny, start + rows)
                view = block[:, :stop - start]
                for i in range(self.n):
                    view[i] = self._rows(i, start, stop)
                np.nanmedian(view, axis=0, overwrite_input=True, out=out[start:stop])
        return out


def abs_derivative(array: np.ndarray) -> np.ndarray:
    """Largest |difference| between each pixel and its up/down/left/right neighbours (NaN stays NaN)."""
    out = np.zeros_like(array)
    if np.issubdtype(array.dtype, np.floating):
        out[np.isnan(array)] = np.nan
    row_diff = np.abs(np.diff(array, axis=0))
    np.putmask(out[1:], np.isfinite(row_diff), row_diff)
    view = out[:-1]
    np.putmask(view, row_diff > view, row_diff)
    del row_diff
    col_diff = np.abs(np.diff(array, axis=1))
    view = out[:, 1:]
    np.putmask(view, col_diff > view, col_diff)
    view = out[:, :-1]
    np.putmask(view, col_diff > view, col_diff)
    return out


def _flag_block(sci: np.ndarray, err: np.ndarray, blot_data: np.ndarray, snr: tuple[float, float],
                scale: tuple[float, float], backg: float) -> np.ndarray:
    from scipy import ndimage  # noqa: PLC0415

    err_data = np.nan_to_num(err)
    deriv = abs_derivative(blot_data)
    diff = np.abs(sci - blot_data - backg)
    mask1 = np.greater(diff, scale[0] * deriv + snr[0] * err_data)
    grown = ndimage.convolve(mask1, np.ones((3, 3), dtype=int), mode="nearest")
    mask2 = np.greater(diff, scale[1] * deriv + snr[1] * err_data)
    return grown & mask2


def flag_outliers(sci: np.ndarray, err: np.ndarray, blot_data: np.ndarray, *, snr: tuple[float, float] = (5.0, 4.0),
                  scale: tuple[float, float] = (1.2, 0.7), backg: float = 0.0,
                  block_rows: int = FLAG_BLOCK_ROWS) -> np.ndarray:
    """bool (ny, nx): outliers of ``sci`` against the blotted median (stcal's ``flag_resampled_crs``).

    ``err`` is the exposure's ERR (NaN counts as 0); ``backg`` the sky level still in ``sci``.
    Evaluated in blocks of ``block_rows`` rows plus a two-row halo on each side.
    """
    ny = sci.shape[0]
    out = np.empty(sci.shape, dtype=bool)
    halo = 2
    for start in range(0, ny, block_rows):
        stop = min(ny, start + block_rows)
        lo, hi = max(0, start - halo), min(ny, stop + halo)
        block = _flag_block(sci[lo:hi], err[lo:hi], blot_data[lo:hi], snr, scale, backg)
        out[start:stop] = block[start - lo:stop - lo]
    return out


def apply_outlier_flags(dq: np.ndarray, mask: np.ndarray) -> int:
    """DQ |= OUTLIER | DO_NOT_USE where ``mask`` (in place); returns the number flagged."""
    dq[mask] |= _FLAG
    return int(np.count_nonzero(mask))


__all__ = [
    "MEDIAN_BLOCK_BYTES", "MedianStack", "abs_derivative", "apply_outlier_flags", "flag_outliers",
    "mask_low_weight", "single_drizzle", "weight_threshold",
]
