"""Reading JWST reference files: subarray extraction, DQ_DEF translation, row-chunk access.

A :class:`Reference` maps science rows/columns onto the reference's own pixel grid: full-frame
references serve any subarray they cover (SUBSTRT/SUBSIZE, 1-based), exactly matching ones serve
as they are. Arrays are read a row chunk at a time, never whole (darks are hundreds of MB).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from astropy.io import fits

from .dqflags import translate_reference_dq
from .errors import ReferenceFileError
from .exposure import Exposure
from .fitsio import ImageLayout, RowReader, image_layout, open_header


@dataclass
class Reference:
    """An opened reference file, positioned on one exposure's subarray."""

    reftype: str
    path: str
    exposure: Exposure
    _hdul: fits.HDUList = field(init=False, repr=False)
    _readers: dict[str, RowReader] = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        try:
            self._hdul = open_header(self.path)
        except Exception as exc:
            raise ReferenceFileError(self.reftype, f"cannot open: {exc}", self.path) from exc
        self._check_instrument()

    @property
    def header(self) -> fits.Header:
        return self._hdul[0].header

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        self._hdul.close()

    def has(self, extname: str) -> bool:
        return extname in [h.name for h in self._hdul]

    def _check_instrument(self) -> None:
        instrument = str(self.header.get("INSTRUME", self.exposure.instrument)).strip().upper()
        if instrument != self.exposure.instrument:
            raise ReferenceFileError(self.reftype, f"is for {instrument}, exposure is "
                                                   f"{self.exposure.instrument}", self.path)

    def layout(self, extname: str) -> ImageLayout:
        try:
            return image_layout(self._hdul, extname, self.path)
        except Exception as exc:
            raise ReferenceFileError(self.reftype, str(exc), self.path) from exc

    def _reader(self, extname: str) -> RowReader:
        if extname not in self._readers:
            self._readers[extname] = RowReader(self.layout(extname))
        return self._readers[extname]

    @cached_property
    def offset(self) -> tuple[int, int]:
        """(row, column) of the science subarray's first pixel in this reference's arrays."""
        return self._subarray_offset()

    def _subarray_offset(self) -> tuple[int, int]:
        exp = self.exposure
        ext = "SCI" if self.has("SCI") else ("DQ" if self.has("DQ") else "COEFFS")
        ny, nx = self.layout(ext).shape[-2:]
        ref1 = int(self.header.get("SUBSTRT1", 1))
        ref2 = int(self.header.get("SUBSTRT2", 1))
        dx, dy = exp.substrt1 - ref1, exp.substrt2 - ref2
        if dx < 0 or dy < 0 or dx + exp.subsize1 > nx or dy + exp.subsize2 > ny:
            raise ReferenceFileError(
                self.reftype,
                f"does not cover the science subarray {exp.subarray} (SUBSTRT {exp.substrt1},{exp.substrt2} "
                f"SUBSIZE {exp.subsize1}x{exp.subsize2}); reference covers SUBSTRT {ref1},{ref2} size {nx}x{ny}",
                self.path)
        return dy, dx

    def rows(self, extname: str, y0: int, y1: int, dtype: type = np.float32,
             nplanes: int | None = None, x0: int = 0, x1: int | None = None) -> np.ndarray:
        """Science rows [y0, y1), columns [x0, x1) of ``extname`` (leading planes kept), as ``dtype``."""
        dy, dx = self.offset
        x1 = self.exposure.subsize1 if x1 is None else x1
        return self._reader(extname).read(y0 + dy, y1 + dy, dtype=dtype, x0=dx + x0, x1=dx + x1,
                                          nplanes=nplanes)

    def dq_rows(self, y0: int, y1: int, extname: str = "DQ", x0: int = 0, x1: int | None = None) -> np.ndarray:
        """Science rows of the DQ array in pipeline bits (DQ_DEF applied), uint32 (..., ny, nx).

        A reference without a DQ extension contributes no flags.
        """
        x1 = self.exposure.subsize1 if x1 is None else x1
        if not self.has(extname):
            return np.zeros((y1 - y0, x1 - x0), dtype=np.uint32)
        dq = self.rows(extname, y0, y1, dtype=np.uint32, x0=x0, x1=x1)
        return translate_reference_dq(dq, self.dq_def)

    @cached_property
    def dq_def(self) -> list[dict[str, object]] | None:
        if not self.has("DQ_DEF"):
            return None
        table = self._hdul["DQ_DEF"].data
        return [{name.upper(): row[name] for name in table.names} for row in table]

    def whole(self, extname: str, dtype: type = np.float32) -> np.ndarray:
        """A small extension whole (IPC kernels), without subarray extraction."""
        layout = self.layout(extname)
        with RowReader(layout) as reader:
            return reader.read(0, layout.shape[-2], dtype=dtype)

    def keyword(self, key: str, default: object = None) -> object:
        return self.header.get(key, default)


def open_reference(reftype: str, path: str | Path, exposure: Exposure) -> Reference:
    """Open ``path`` as the ``reftype`` reference for ``exposure``, checking coverage early."""
    ref = Reference(reftype, str(path), exposure)
    ref.offset  # noqa: B018 - fail now, not mid-exposure, if the subarray is not covered
    return ref
