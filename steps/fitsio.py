"""Low-level FITS access: row-chunk reads without holding whole arrays, atomic writes.

Image extensions are memory-mapped read-only and decoded a block of rows at a time, so reading a
4-D ramp costs memory for one row chunk only. Writes go to a temporary name in the
destination folder and are renamed into place, so no reader ever sees a half-written product.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from astropy.io import fits

from .errors import InputError

_BITPIX_DTYPES = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


@dataclass(frozen=True)
class ImageLayout:
    """Where an image extension's pixels live in its file and how to decode them."""

    path: str
    name: str
    offset: int          # byte offset of the first pixel
    shape: tuple[int, ...]  # numpy order, e.g. (nints, ngroups, ny, nx)
    disk_dtype: np.dtype
    bzero: float
    bscale: float

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.disk_dtype.itemsize

    @property
    def native_dtype(self) -> np.dtype:
        """The dtype the values decode to (uint16 for BITPIX=16/BZERO=32768, ...)."""
        kind = self.disk_dtype.kind
        if self.bscale == 1.0 and kind == "i" and self.bzero == 2 ** (8 * self.disk_dtype.itemsize - 1):
            return np.dtype(f"u{self.disk_dtype.itemsize}")
        if self.bscale == 1.0 and self.bzero == 0.0:
            return self.disk_dtype.newbyteorder("=")
        return np.dtype(np.float32 if self.disk_dtype.itemsize <= 4 else np.float64)


def open_header(path: str | Path) -> fits.HDUList:
    """Open a FITS file lazily (headers only), turning unreadable files into InputError."""
    path = str(path)
    if not os.path.exists(path):
        raise InputError(path, "file does not exist")
    try:
        hdul = fits.open(path, memmap=False, lazy_load_hdus=True)
        hdul[0].header  # noqa: B018 - force the primary header to parse
    except (OSError, ValueError, TypeError, IndexError) as exc:
        raise InputError(path, f"not a readable FITS file ({exc})") from exc
    return hdul


def image_layout(hdul: fits.HDUList, name: str, path: str | Path) -> ImageLayout:
    """The layout of image extension ``name``; InputError if absent or truncated."""
    path = str(path)
    try:
        hdu = hdul[name]
    except (KeyError, IndexError) as exc:
        raise InputError(path, f"no {name} extension") from exc
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read the {name} extension header ({exc})") from exc
    header = hdu.header
    bitpix = int(header.get("BITPIX", 0))
    if bitpix not in _BITPIX_DTYPES or header.get("XTENSION", "IMAGE").strip() not in ("IMAGE", ""):
        raise InputError(path, f"{name} is not an image extension (BITPIX={bitpix})")
    naxis = int(header.get("NAXIS", 0))
    shape = tuple(int(header[f"NAXIS{i}"]) for i in range(naxis, 0, -1))
    layout = ImageLayout(path, name, int(hdu.fileinfo()["datLoc"]), shape,
                         np.dtype(_BITPIX_DTYPES[bitpix]), float(header.get("BZERO", 0.0)),
                         float(header.get("BSCALE", 1.0)))
    if os.path.getsize(path) < layout.offset + layout.nbytes:
        raise InputError(path, f"file is truncated: {name} needs {layout.nbytes} bytes at offset "
                               f"{layout.offset}, file has {os.path.getsize(path)}")
    return layout


class RowReader:
    """Reads row blocks of an image extension of any dimensionality >= 2.

    ``read(y0, y1)`` returns ``shape[:-2] + (y1 - y0, nx)`` decoded to ``dtype`` (default the
    native dtype). Rows are the second-to-last axis. The file is memory-mapped read-only and
    values are decoded straight from the page cache, so a column window costs only the pages it
    touches (the 4-pixel reference strips of a frame are a few per cent of it).
    """

    def __init__(self, layout: ImageLayout) -> None:
        self.layout = layout
        self._map: mmap.mmap | None = None
        self._pixels: np.ndarray | None = None

    def close(self) -> None:
        self._pixels = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:   # a caller still holds a view; the map goes with it
                pass
            self._map = None

    def __enter__(self) -> "RowReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def _planes(self) -> np.ndarray:
        """The extension's pixels as stored (big-endian), shape (planes, ny, nx), read-only."""
        if self._pixels is None:
            lay = self.layout
            with open(lay.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < lay.offset + lay.nbytes:
                    raise InputError(lay.path, f"short read in {lay.name} (file truncated?)")
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            ny, nx = lay.shape[-2:]
            count = lay.nbytes // lay.disk_dtype.itemsize
            flat = np.frombuffer(self._map, dtype=lay.disk_dtype, count=count, offset=lay.offset)
            self._pixels = flat.reshape(-1, ny, nx)
        return self._pixels

    def read(self, y0: int, y1: int, dtype: np.dtype | type | None = None,
             out: np.ndarray | None = None, x0: int = 0, x1: int | None = None,
             nplanes: int | None = None) -> np.ndarray:
        """Rows [y0, y1) and columns [x0, x1) of the leading planes, decoded.

        ``nplanes`` limits a 3-D image to its first planes (e.g. the dark frames a readout needs).
        """
        lay = self.layout
        ny, nx = lay.shape[-2:]
        x1 = nx if x1 is None else x1
        if not (0 <= y0 <= y1 <= ny and 0 <= x0 <= x1 <= nx):
            raise IndexError(f"rows [{y0}, {y1}) x columns [{x0}, {x1}) outside {ny}x{nx} "
                             f"of {lay.name} in {lay.path}")
        lead = lay.shape[:-2]
        if nplanes is not None:
            if len(lead) != 1 or nplanes > lead[0]:
                raise IndexError(f"{nplanes} planes requested from {lay.name} of shape {lay.shape}")
            lead = (nplanes,)
        planes = int(np.prod(lead, dtype=np.int64))
        pixels = self._planes()
        if self._map is not None and self._map.size() < lay.offset + lay.nbytes:   # fstat of the mapped file
            raise InputError(lay.path, f"{lay.name} truncated while being read (the file was rewritten in place)")
        raw = pixels[:planes, y0:y1, x0:x1]
        dtype = np.dtype(dtype) if dtype is not None else lay.native_dtype
        if out is None:
            out = np.empty(lead + (y1 - y0, x1 - x0), dtype=dtype)
        decode_into(raw, lay.bzero, lay.bscale, out.reshape(raw.shape))
        self._release(planes, y0, y1)
        return out

    def _release(self, planes: int, y0: int, y1: int) -> None:
        """Unmap the pages just decoded: they stay in the page cache, but not in this process's
        resident set (a mapped file would otherwise count whole in the RSS)."""
        if self._map is None or y1 <= y0:
            return
        lay = self.layout
        ny, nx = lay.shape[-2:]
        row_bytes = nx * lay.disk_dtype.itemsize
        for p in range(planes):
            start = lay.offset + (p * ny + y0) * row_bytes
            aligned = start - start % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, aligned, start - aligned + (y1 - y0) * row_bytes)


#: below this many values the numpy path is as fast as the compiled one
_FAST_DECODE_MIN = 65536


def decode_into(raw: np.ndarray, bzero: float, bscale: float, out: np.ndarray) -> None:
    """Apply FITS scaling (BSCALE, BZERO) to big-endian ``raw`` (any strides, left unchanged)
    and store into ``out`` (same shape)."""
    if _decode_fast(raw, bzero, bscale, out):
        return
    kind = raw.dtype.kind
    if bscale == 1.0 and kind == "i" and bzero == 2 ** (8 * raw.dtype.itemsize - 1):
        unsigned = raw.view(raw.dtype.str.replace("i", "u"))
        np.bitwise_xor(unsigned, np.array(bzero, dtype=unsigned.dtype.newbyteorder("=")), out=out,
                       casting="unsafe")
        return
    if bscale == 1.0 and bzero == 0.0:
        out[...] = raw
        return
    np.multiply(raw, bscale, out=out, casting="unsafe")
    out += np.asarray(bzero, dtype=out.dtype)


def _decode_fast(raw: np.ndarray, bzero: float, bscale: float, out: np.ndarray) -> bool:
    """The compiled one-pass decoders for the common large cases; False if none applies.

    ``raw`` is (planes, rows, cols) with any strides; ``out`` C-contiguous of the same shape."""
    if raw.size < _FAST_DECODE_MIN or raw.ndim != 3 or not out.flags.c_contiguous or bscale != 1.0:
        return False
    from . import _decode  # noqa: PLC0415 - numba only when big arrays are decoded

    if raw.dtype == np.dtype(">i2") and bzero == 32768 and out.dtype == np.float32:
        _decode.be_u16_offset_to_f32(raw.view(np.uint16), out)
        return True
    if raw.dtype == np.dtype(">i4") and bzero == 2 ** 31 and out.dtype == np.uint32:
        _decode.be_u32_to_u32(raw.view(np.uint32), out, np.uint32(1 << 31))
        return True
    if raw.dtype.itemsize == 4 and bzero == 0 and raw.dtype.kind in "fi" and out.dtype.itemsize == 4 \
            and (out.dtype.kind == raw.dtype.kind or (raw.dtype.kind == "i" and out.dtype == np.uint32)):
        _decode.be_u32_to_u32(raw.view(np.uint32), out.view(np.uint32), np.uint32(0))
        return True
    return False


def read_image(hdul: fits.HDUList, name: str, path: str | Path, dtype: np.dtype | type | None = None) -> np.ndarray:
    """A whole image extension, decoded (for small arrays and reference planes)."""
    layout = image_layout(hdul, name, path)
    with RowReader(layout) as reader:
        return reader.read(0, layout.shape[-2], dtype=dtype)


@contextmanager
def atomic_output(path: str | Path, fsync: bool = True) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)   # mkstemp makes 0600; products are as readable as open() makes them
    finally:
        os.close(fd)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _process_umask() -> int:
    """This process's umask (read once: setting it to query it is not thread-safe later)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _process_umask()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_hdulist(hdul: fits.HDUList, path: str | Path, fsync: bool = True) -> None:
    """Write ``hdul`` to ``path`` atomically (temp file + rename), byte-identical to astropy's writeto.

    Image data are encoded (big-endian, BZERO-offset unsigned integers) and written a block at a
    time, so writing costs one small buffer, not a big-endian copy of every array.
    """
    hdul.verify("silentfix")
    with atomic_output(path, fsync=fsync) as tmp, open(tmp, "wb") as fh:
        for hdu in hdul:
            fh.write(hdu.header.tostring().encode("ascii"))
            if hdu.data is None:
                continue
            flat = np.ascontiguousarray(hdu.data).reshape(-1)
            for start in range(0, flat.size, WRITE_BLOCK_VALUES):
                fh.write(memoryview(encode_fits_data(flat[start:start + WRITE_BLOCK_VALUES])).cast("B"))
            fh.write(bytes(-flat.nbytes % FITS_BLOCK))


FITS_BLOCK = 2880
#: values encoded and written at a time (4 MB of float32)
WRITE_BLOCK_VALUES = 1 << 20
_UNSIGNED_OFFSET = {np.dtype(np.uint16): np.uint16(1 << 15), np.dtype(np.uint32): np.uint32(1 << 31),
                    np.dtype(np.uint64): np.uint64(1 << 63)}


def encode_fits_data(array: np.ndarray) -> np.ndarray:
    """The FITS on-disk form of an image array: big-endian, C order; unsigned integers stored
    signed with the BZERO offset astropy declares (uint32 -> int32 + 2**31), int8 as uint8 with
    BZERO -128."""
    dtype = array.dtype
    if dtype == np.int8:
        return np.ascontiguousarray(array).view(np.uint8) ^ np.uint8(0x80)      # value + 128
    offset = _UNSIGNED_OFFSET.get(dtype.newbyteorder("="))
    if offset is not None:
        flipped = np.ascontiguousarray(array) ^ offset    # value - 2**(bits-1), two's complement
        signed = flipped.view(flipped.dtype.str.replace("u", "i"))
        return signed.astype(signed.dtype.newbyteorder(">"), copy=False)
    return np.ascontiguousarray(array, dtype=dtype.newbyteorder(">"))
