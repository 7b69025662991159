"""Drizzle resampling for imaging: the output grid, streaming co-addition, and blotting back.

The science is jwst 3.0's ``ResampleStep`` for imaging (``jwst.resample`` over ``stcal.resample``):

* :func:`output_grid` - a tangent-plane grid over the inputs' footprints: fiducial at the centre
  of the union of footprints, pixel scale measured on the first input (times ``pixel_scale_ratio``)
  or given, orientation of the first input (or ``rotation`` = PA of the output Y axis);
* :class:`MosaicAccumulator` - inputs are added ONE AT A TIME (``drizzle.resample.Drizzle``, square
  kernel, ``pixfrac``, inverse read-noise variance weights, DQ masking by ``good_bits``); it holds
  the output arrays only, so memory does not grow with the number of exposures. Variances are
  propagated as jwst does: each of VAR_RNOISE/VAR_FLAT/VAR_POISSON is drizzled as sqrt(var) with
  the data's weights, squared, and co-added with weights w = 1/VAR_RNOISE_resampled (ivm) or the
  exposure time: var_out = sum(var w^2) / (sum w)^2; ERR = sqrt(sum of the three);
* :func:`blot` - the inverse mapping (median mosaic -> an input's pixels), bilinear, for outlier
  detection.

Pixel maps (input pixel -> world -> output pixel through the gwcs objects) are evaluated in row
chunks, which bounds the transform temporaries; values are identical to a whole-frame evaluation.
Arrays are numpy ``(ny, nx)``: float32 images, uint32 DQ; world coordinates in degrees.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numba
import numpy as np

from . import dqflags

#: jwst's ResampleStep: all DQ flags allowed except DO_NOT_USE and NON_SCIENCE
GOOD_BITS = "~DO_NOT_USE+NON_SCIENCE"
VARIANCE_NAMES = ("var_rnoise", "var_flat", "var_poisson")   # stcal's order
KERNELS = ("square", "gaussian", "point", "turbo", "lanczos2", "lanczos3")
WEIGHT_TYPES = ("ivm-smed", "ivm", "exptime", None)
#: weight types that weight by inverse VAR_RNOISE (and combine the variances with those weights)
IVM_TYPES = ("ivm", "ivm-smed")
#: half-width [pixels] of the separable running median "ivm-smed" applies to VAR_RNOISE
IVM_SMOOTH_HALF = 3
#: pixels per pixel-map chunk (~2 MB per float64 coordinate array)
PIXMAP_CHUNK_PIXELS = 1 << 18
ARCSEC_PER_RADIAN = float(np.rad2deg(3600.0))


# ---------------------------------------------------------------------------------------------
# DQ masks and weights
# ---------------------------------------------------------------------------------------------

def bad_bits(good_bits: int | str | None) -> int:
    """The DQ bits that make a pixel unusable, from a jwst ``good_bits`` specification.

    An int or ``"4+8"`` / ``"JUMP_DET, DROPOUT"`` lists flags to IGNORE (every other set bit is
    bad); a leading ``~`` (``"~DO_NOT_USE+NON_SCIENCE"``) lists the bad flags instead. ``None``
    (or ``"~0"``) disables DQ masking (0 is returned).
    """
    if good_bits is None:
        return 0
    if isinstance(good_bits, str) and good_bits.strip().startswith("~"):
        return dqflags.interpret_flags(good_bits.strip()[1:])
    return ~dqflags.interpret_flags(good_bits) & 0xFFFFFFFF


def good_pixel_mask(dq: np.ndarray, good_bits: int | str | None) -> np.ndarray:
    """uint8 (ny, nx): 1 where no bad DQ bit is set (see :func:`bad_bits`), else 0."""
    bits = np.uint32(bad_bits(good_bits))
    return ((dq & bits) == 0).astype(np.uint8)


def drizzle_weight(dq: np.ndarray, var_rnoise: np.ndarray | None, weight_type: str | None,
                   good_bits: int | str | None, exposure_time: float | None = None) -> np.ndarray:
    """float32 (ny, nx) input weights as stcal's ``build_driz_weight``, plus calstream's ``"ivm-smed"``.

    ``"ivm"``: 1/VAR_RNOISE (0 where not finite; 1 everywhere when VAR_RNOISE is missing);
    ``"ivm-smed"``: 1/:func:`weighting_variance` — the weights follow the exposure's depth and
    amplifier structure but not its pixel-to-pixel read-noise scatter (which, on undersampled
    PSFs, shifts point-source fluxes by ~1% rms);
    ``"exptime"``: the (measurement) exposure time [s]; None: 1. Bad DQ pixels get 0.
    """
    mask = good_pixel_mask(dq, good_bits)
    if weight_type in IVM_TYPES:
        var = weighting_variance(var_rnoise, weight_type)
        if var is not None and var.shape == dq.shape:
            with np.errstate(divide="ignore", invalid="ignore"):
                inv = 1.0 / var
            inv[~np.isfinite(inv)] = 0
        else:
            inv = np.ones(dq.shape, dtype=np.float32)
        result = inv * mask
    elif weight_type == "exptime":
        if exposure_time is None:
            raise ValueError("weight_type='exptime' needs the exposure time")
        result = np.float32(exposure_time) * mask
    elif weight_type is None:
        result = mask
    else:
        raise ValueError(f"unknown weight_type {weight_type!r}; expected one of {WEIGHT_TYPES}")
    return result.astype(np.float32)


def weighting_variance(var_rnoise: np.ndarray | None, weight_type: str | None) -> np.ndarray | None:
    """The variance an ivm weighting inverts: VAR_RNOISE itself ("ivm"), or its running median
    (:func:`smoothed_variance`) where VAR_RNOISE is finite and positive, NaN elsewhere ("ivm-smed");
    None for the other weight types or without VAR_RNOISE."""
    if weight_type not in IVM_TYPES or var_rnoise is None:
        return None
    if weight_type == "ivm":
        return var_rnoise
    return np.where(np.isfinite(var_rnoise) & (var_rnoise > 0), smoothed_variance(var_rnoise), np.float32(np.nan))


def smoothed_variance(var: np.ndarray, half: int = IVM_SMOOTH_HALF) -> np.ndarray:
    """float32 (ny, nx) running median of ``var`` over (2 half + 1) pixels along rows, then along
    columns (a separable median; non-finite and non-positive values ignored, NaN where none)."""
    rows = _running_median_rows(np.ascontiguousarray(var, dtype=np.float32), half)
    return np.ascontiguousarray(_running_median_rows(np.ascontiguousarray(rows.T), half).T)


@numba.njit(cache=True, nogil=True)
def _running_median_rows(values: np.ndarray, half: int) -> np.ndarray:
    ny, nx = values.shape
    out = np.empty((ny, nx), np.float32)
    window = np.empty(2 * half + 1, np.float32)
    for i in range(ny):
        for j in range(nx):
            n = 0
            for x in range(max(0, j - half), min(nx, j + half + 1)):
                v = values[i, x]
                if v > 0 and v < np.inf:        # insertion into the sorted window
                    k = n
                    while k > 0 and window[k - 1] > v:
                        window[k] = window[k - 1]
                        k -= 1
                    window[k] = v
                    n += 1
            if n == 0:
                out[i, j] = np.nan
            elif n % 2:
                out[i, j] = window[n // 2]
            else:
                out[i, j] = 0.5 * (window[n // 2 - 1] + window[n // 2])
    return out


# ---------------------------------------------------------------------------------------------
# Geometry: scales, areas, the output grid
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WcsReference:
    """The first input's aperture orientation (jwst meta.wcsinfo): degrees; vparity +-1."""

    ra_ref: float
    dec_ref: float
    roll_ref: float
    v3yangle: float
    vparity: int


@dataclass
class OutputGrid:
    """The resampled image's frame: gwcs (TAN, ``FITSImagingWCSTransform``) and shape (ny, nx)."""

    wcs: Any
    shape: tuple[int, int]
    pixel_scale: float          # arcsec
    pixel_scale_ratio: float    # output / input pixel scale
    crpix: tuple[float, float]  # 0-based
    crval: tuple[float, float]  # deg
    pc: np.ndarray              # (2, 2)

    @property
    def key(self) -> int:
        """Identifies the grid's geometry (equal for grids built from the same parameters)."""
        return hash((self.shape, self.crpix, self.crval, self.pixel_scale, tuple(self.pc.ravel())))

    @property
    def pixelarea_arcsecsq(self) -> float:
        return self.pixel_scale ** 2

    @property
    def pixelarea_steradians(self) -> float:
        return self.pixel_scale ** 2 / ARCSEC_PER_RADIAN ** 2

    def fits_wcsinfo(self) -> dict[str, Any]:
        """FITS WCS keywords (jwst meta.wcsinfo names) describing the grid exactly."""
        cdelt = self.pixel_scale / 3600.0
        return {"crpix1": self.crpix[0] + 1.0, "crpix2": self.crpix[1] + 1.0, "crval1": self.crval[0],
                "crval2": self.crval[1], "cdelt1": cdelt, "cdelt2": cdelt, "pc1_1": float(self.pc[0, 0]),
                "pc1_2": float(self.pc[0, 1]), "pc2_1": float(self.pc[1, 0]), "pc2_2": float(self.pc[1, 1]),
                "ctype1": "RA---TAN", "ctype2": "DEC--TAN", "cunit1": "deg", "cunit2": "deg",
                "radesys": "ICRS"}


def footprint(wcs: Any) -> np.ndarray:
    """(4, 2) RA/Dec [deg] of the bounding-box corners (pixel edges), rounded as S_REGION is."""
    corners = np.asarray(wcs.footprint(center=False), dtype=np.float64)
    corners[:, 0] %= 360.0
    return np.array([[float(f"{v:.9f}") for v in row] for row in corners])


def compute_scale(wcs: Any, fiducial: tuple[float, float]) -> float:
    """Pixel scale [deg] of ``wcs`` at a sky position: sqrt(x step * y step) of one pixel there."""
    from astropy.coordinates import SkyCoord  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "invalid value encountered in sqrt", RuntimeWarning)
        crpix = np.array(wcs.invert(*fiducial, with_bounding_box=False))
    points = np.vstack((crpix, crpix + [1, 0], crpix + [0, 1])).T
    ra, dec = wcs(*points, with_bounding_box=False)
    coords = SkyCoord(ra=ra, dec=dec, unit="deg")
    xscale = abs(coords[0].separation(coords[1]).value)
    yscale = abs(coords[0].separation(coords[2]).value)
    return float(np.sqrt(xscale * yscale))


def _unit_vectors(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    lon, lat = np.deg2rad(ra), np.deg2rad(dec)
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1)


def spherical_polygon_area(ra: np.ndarray, dec: np.ndarray, center: tuple[float, float]) -> float:
    """Solid angle [sr] of the polygon with great-circle edges through the vertices (deg).

    Fan triangulation about ``center`` with the exact triangle formula
    tan(O/2) = a.(b x c) / (1 + a.b + b.c + c.a) (signed, so concave outlines are right too).
    """
    v = _unit_vectors(np.asarray(ra, float), np.asarray(dec, float))
    c = _unit_vectors(np.array([center[0]]), np.array([center[1]]))[0]
    a, b = v, np.roll(v, -1, axis=0)
    triple = np.einsum("ij,ij->i", np.cross(a, b), np.broadcast_to(c, a.shape))
    denom = 1.0 + np.einsum("ij,ij->i", a, b) + a @ c + b @ c
    return float(abs(np.sum(2.0 * np.arctan2(triple, denom))))


def mean_pixel_area(wcs: Any, shape: tuple[int, int]) -> float | None:
    """Average pixel solid angle [sr] over the bounding box: sky area of the outline through the
    edge pixels' centres (points <= 15 px apart) / its area in pixels (stcal's
    ``compute_mean_pixel_area`` for a WCS finite everywhere in its bounding box)."""
    ny, nx = shape
    if wcs.bounding_box is None:
        (x0, x1), (y0, y1) = (-0.5, nx - 0.5), (-0.5, ny - 0.5)
    else:
        (x0, x1), (y0, y1) = wcs.bounding_box
    xmin, xmax = max(0, int(min(x0, x1) + 0.5)), min(nx - 1, int(max(x0, x1) - 0.5))
    ymin, ymax = max(0, int(min(y0, y1) + 0.5)), min(ny - 1, int(max(y0, y1) - 0.5))
    if xmin >= xmax or ymin >= ymax:
        return None
    sx = max(1, math.ceil((xmax - xmin + 1) / max(1, min((xmax - xmin) // 4, 15))))
    sy = max(1, math.ceil((ymax - ymin + 1) / max(1, min((ymax - ymin) // 4, 15))))
    x = np.concatenate([np.linspace(xmin, xmax, sx, False), np.full(sy, float(xmax)),
                        np.linspace(xmax, xmin, sx, False), np.full(sy, float(xmin))])
    y = np.concatenate([np.full(sx, float(ymin)), np.linspace(ymin, ymax, sy, False),
                        np.full(sx, float(ymax)), np.linspace(ymax, ymin, sy, False)])
    ra, dec = wcs(x, y)
    if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
        return None
    center = wcs(0.5 * (xmin + xmax), 0.5 * (ymin + ymax))
    area = spherical_polygon_area(ra, dec, (float(center[0]), float(center[1])))
    return area / ((xmax - xmin) * (ymax - ymin))


def fiducial_of(footprints: Iterable[np.ndarray]) -> tuple[float, float]:
    """Centre [deg] of the union of footprints: mid-point of the unit-vector bounding box."""
    radec = np.vstack(list(footprints))
    xyz = _unit_vectors(radec[:, 0], radec[:, 1])
    mid = 0.5 * (xyz.max(axis=0) + xyz.min(axis=0))
    lon = np.rad2deg(np.arctan2(mid[1], mid[0])) % 360.0
    lat = np.rad2deg(np.arctan2(mid[2], np.sqrt(mid[0] ** 2 + mid[1] ** 2)))
    return float(lon), float(lat)


def rotation_matrix(roll_ref: float, v3yangle: float, vparity: int) -> np.ndarray:
    """(2, 2) PC matrix for a roll and the aperture's V3-to-ideal-Y angle (radians)."""
    if vparity not in (1, -1):
        raise ValueError(f"vparity must be 1 or -1, got {vparity}")
    rel = roll_ref - vparity * v3yangle
    return np.array([[vparity * np.cos(rel), np.sin(rel)], [vparity * -np.sin(rel), np.cos(rel)]])


def output_grid(footprints: Sequence[np.ndarray], ref_wcs: Any, ref: WcsReference, ref_shape: tuple[int, int], *,
                pixel_scale_ratio: float = 1.0, pixel_scale: float | None = None, rotation: float | None = None,
                output_shape: tuple[int, int] | None = None, crpix: tuple[float, float] | None = None,
                crval: tuple[float, float] | None = None) -> OutputGrid:
    """The resampled grid covering ``footprints`` ((N, 2) RA/Dec each), as jwst builds it.

    ``ref_wcs``/``ref``/``ref_shape`` describe the first input. ``pixel_scale`` [arcsec] overrides
    ``pixel_scale_ratio``; ``rotation`` [deg] is the PA of the output Y axis (None: the first input's
    orientation; 0: north up); ``output_shape`` is (ny, nx); ``crpix`` is 0-based (x, y); ``crval``
    (RA, Dec) replaces the footprint centre.
    """
    from astropy.modeling import models  # noqa: PLC0415
    from gwcs import WCS, FITSImagingWCSTransform  # noqa: PLC0415

    if not footprints:
        raise ValueError("no input footprints")
    if pixel_scale is None:
        pscale = compute_scale(ref_wcs, (ref.ra_ref, ref.dec_ref)) * pixel_scale_ratio
    else:
        pscale = pixel_scale / 3600.0
        area = mean_pixel_area(ref_wcs, ref_shape)
        if area is None or area <= 0:
            raise ValueError("cannot measure the first input's pixel area")
        pixel_scale_ratio = pscale / float(np.rad2deg(math.sqrt(area)))
    fid = tuple(crval) if crval is not None else fiducial_of(footprints)
    v3y = np.deg2rad(ref.v3yangle)
    roll = np.deg2rad(ref.roll_ref) if rotation is None else np.deg2rad(rotation) + ref.vparity * v3y
    pc = rotation_matrix(roll, v3y, ref.vparity)
    tan = models.Pix2Sky_TAN()
    transform = (models.AffineTransformation2D(matrix=pc) | models.Scale(pscale) & models.Scale(pscale)
                 | tan | models.RotateNative2Celestial(fid[0], fid[1], 180))
    bbox, shape, offsets = _bounding_box(footprints, transform, fid, crpix, output_shape)
    if any(d < 2 for d in shape):
        raise ValueError(f"output grid too small: shape {shape}")
    fwcs = FITSImagingWCSTransform(tan, crpix=offsets, crval=fid, cdelt=[pscale, pscale], pc=pc)
    wcs = WCS([(ref_wcs.input_frame, fwcs), (ref_wcs.output_frame, None)])
    wcs.bounding_box = bbox
    wcs.pixel_shape = shape[::-1]
    return OutputGrid(wcs, (int(shape[0]), int(shape[1])), 3600.0 * pscale, float(pixel_scale_ratio),
                      (float(offsets[0]), float(offsets[1])), (float(fid[0]), float(fid[1])), pc)


def _bounding_box(footprints: Sequence[np.ndarray], transform: Any, fiducial: tuple[float, float],
                  crpix: tuple[float, float] | None, shape: tuple[int, int] | None
                  ) -> tuple[tuple, tuple[int, int], tuple[float, float]]:
    """(bounding box, (ny, nx), crpix offsets) placing every footprint at >= 0 pixel coordinates."""
    bounds = np.hstack([transform.inverse(*f.T) for f in footprints])
    dmin, dmax = np.min(bounds, axis=1), np.max(bounds, axis=1)
    native = transform.inverse(*fiducial)
    if crpix is None:
        offsets = tuple(n - d for n, d in zip(native, dmin))
    else:
        offsets = tuple(c - n for n, c in zip(native, crpix))
    dmin = dmin + offsets
    dmax = dmax + offsets
    if shape is None:
        shape = tuple(int(d + 0.5) for d in dmax[::-1])
        bbox = tuple((-0.5, s - 0.5) for s in shape[::-1])
    else:
        shape = tuple(shape)
        bbox = tuple((max(0, int(lo + 0.5)) - 0.5, min(int(hi + 0.5), s) - 0.5)
                     for lo, hi, s in zip(dmin, dmax, shape[::-1]))
    return bbox, shape, offsets


# ---------------------------------------------------------------------------------------------
# Pixel maps and blotting
# ---------------------------------------------------------------------------------------------

def row_chunks(ny: int, nx: int, chunk_pixels: int = PIXMAP_CHUNK_PIXELS) -> Iterable[slice]:
    """Row slices covering ``ny`` rows, each about ``chunk_pixels`` pixels."""
    rows = max(1, chunk_pixels // max(1, nx))
    for start in range(0, ny, rows):
        yield slice(start, min(ny, start + rows))


def pixel_map(wcs_from: Any, wcs_to: Any, shape: tuple[int, int], rows: slice | None = None) -> np.ndarray:
    """float64 (nrows, nx, 2): (x, y) in ``wcs_to``'s pixels of the pixel centres of ``wcs_from``.

    ``rows`` selects a block of rows of the ``shape`` (ny, nx) frame (all rows by default).
    Pixels outside ``wcs_from``'s bounding box are NaN; ``wcs_to``'s bounding box is ignored.
    """
    ny, nx = shape
    rows = rows or slice(0, ny)
    y, x = np.mgrid[rows.start:rows.stop, 0:nx].astype(np.float64)
    if _inside_bounding_box(wcs_from, x, y):
        world = wcs_from(x, y, with_bounding_box=False)    # same values, without the bbox bookkeeping
    else:
        world = wcs_from.pixel_to_world_values(x, y)
    bbox_to = wcs_to.bounding_box
    wcs_to.bounding_box = None
    try:
        ox, oy = wcs_to.world_to_pixel_values(*world)
    finally:
        if bbox_to is not None:
            wcs_to.bounding_box = bbox_to
    return np.dstack([ox, oy])


def _inside_bounding_box(wcs: Any, x: np.ndarray, y: np.ndarray) -> bool:
    """True when every (x, y) lies within ``wcs``'s bounding box (or it has none)."""
    bbox = wcs.bounding_box
    if bbox is None:
        return True
    try:
        bbox = bbox.bounding_box(order="F")
    except AttributeError:
        pass
    (x0, x1), (y0, y1) = bbox
    return bool(x.min() >= x0 and x.max() <= x1 and y.min() >= y0 and y.max() <= y1)


def full_pixel_map(wcs_from: Any, wcs_to: Any, shape: tuple[int, int],
                   chunk_pixels: int = PIXMAP_CHUNK_PIXELS) -> np.ndarray:
    """:func:`pixel_map` of the whole frame, evaluated in row chunks into one array."""
    out = np.empty(tuple(shape) + (2,), dtype=np.float64)
    for rows in row_chunks(*shape, chunk_pixels):
        out[rows] = pixel_map(wcs_from, wcs_to, shape, rows)
    return out


def blot(median: np.ndarray, grid_wcs: Any, target_wcs: Any, target_shape: tuple[int, int], *,
         fillval: float = np.nan, pixmap: np.ndarray | None = None,
         chunk_pixels: int = PIXMAP_CHUNK_PIXELS) -> np.ndarray:
    """float32 ``target_shape``: ``median`` (on ``grid_wcs``) interpolated (bilinear) at every
    target pixel, as jwst's outlier detection blots the median back (unmapped pixels: fillval).

    ``pixmap`` (target pixel -> grid pixel, :func:`full_pixel_map`) may be given to skip the WCS.
    """
    from drizzle.resample import blot_image  # noqa: PLC0415

    data = np.asarray(median, dtype=np.float32)
    out = np.full(target_shape, fillval, dtype=np.float32)
    for rows in row_chunks(*target_shape, chunk_pixels):
        if pixmap is None:
            pmap = pixel_map(target_wcs, grid_wcs, target_shape, rows)
        else:
            pmap = np.array(pixmap[rows], dtype=np.float64)
        pmap[np.isnan(pmap)] = -1     # tblot cannot take NaN coordinates (what stcal does)
        block = out[rows]
        blot_image(data=data, pixmap=pmap, out_img=block, fillval=fillval, iscale=1.0, interp="linear")
    return out


class PixmapCache:
    """Per-exposure arrays computed once and kept in one anonymous temporary file (not in RAM,
    and gone with the process however it ends): pixel maps of inputs onto grids, and the
    variances "ivm-smed" weights by.

    Outlier detection drizzles and blots each exposure with the same map, and the final resample
    reuses it when its grid is the same: one WCS evaluation per exposure instead of three.
    Use as a context manager.
    """

    def __init__(self, directory: str | Path | None = None,
                 chunk_pixels: int = PIXMAP_CHUNK_PIXELS) -> None:
        self._file = tempfile.TemporaryFile(prefix=".calstream-scratch-", dir=directory)
        self._index: dict[tuple[str, ...], tuple[int, np.dtype, tuple[int, ...]]] = {}
        self._end = 0
        self.chunk_pixels = chunk_pixels
        self.computed = 0

    def __enter__(self) -> "PixmapCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Delete the file."""
        self._index.clear()
        self._file.close()

    def get(self, key: str, wcs_from: Any, grid: "OutputGrid", shape: tuple[int, int]) -> np.ndarray:
        """The map of input ``key`` (with ``wcs_from``, ``shape``) onto ``grid``."""
        ident = ("pixmap", key, grid.key)
        if ident not in self._index:
            self._put(ident, full_pixel_map(wcs_from, grid.wcs, shape, self.chunk_pixels))
            self.computed += 1
        return self._read(ident)

    def weighting_variance(self, key: str, var_rnoise: np.ndarray | None, weight_type: str | None
                           ) -> np.ndarray | None:
        """:func:`weighting_variance` of input ``key``, smoothed once: the first VAR_RNOISE given
        for ``key`` decides (later passes read crf copies that differ only where DQ masks them)."""
        if weight_type != "ivm-smed" or var_rnoise is None:
            return weighting_variance(var_rnoise, weight_type)
        ident = ("ivm-smed", key)
        if ident not in self._index:
            self._put(ident, weighting_variance(var_rnoise, weight_type))
        return self._read(ident)

    def _put(self, ident: tuple[str, ...], array: np.ndarray) -> None:
        data = np.ascontiguousarray(array)
        os.pwrite(self._file.fileno(), data.tobytes(), self._end)
        self._index[ident] = (self._end, data.dtype, data.shape)
        self._end += data.nbytes

    def _read(self, ident: tuple[str, ...]) -> np.ndarray:
        offset, dtype, shape = self._index[ident]
        out = np.empty(shape, dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < out.nbytes:            # pread may return less than asked for large reads
            n = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"scratch file ended {out.nbytes - done} bytes short")
            done += n
        return out


# ---------------------------------------------------------------------------------------------
# Streaming co-addition
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExposureTimes:
    """Exposure timing [s; MJD for start/end] (jwst meta.exposure)."""

    exposure_time: float
    start_time: float | None = None
    end_time: float | None = None
    duration: float | None = None
    measurement_time: float | None = None

    def weight_time(self) -> float:
        """The measurement time when known, else the exposure time (exptime weighting)."""
        return self.measurement_time if self.measurement_time is not None else self.exposure_time


@dataclass
class ResampleInput:
    """One exposure to add: arrays (ny, nx), its (possibly tweaked) gwcs and metadata.

    ``sky_level`` is subtracted before drizzling unless ``sky_subtracted`` (skymatch's record).
    Variance arrays may be None (then not propagated for this input, as stcal skips them).
    """

    sci: np.ndarray
    dq: np.ndarray
    wcs: Any
    times: ExposureTimes
    group_id: str
    var_rnoise: np.ndarray | None = None
    var_poisson: np.ndarray | None = None
    var_flat: np.ndarray | None = None
    sky_level: float | None = None
    sky_subtracted: bool = False
    name: str = ""
    #: the variance an ivm weighting inverts, when already computed (:meth:`PixmapCache.weighting_variance`)
    weighting_var: np.ndarray | None = None


@dataclass
class Mosaic:
    """A finished resampled image: float32 arrays on ``grid`` and the combined exposure times."""

    grid: OutputGrid
    sci: np.ndarray
    wht: np.ndarray
    con: np.ndarray | None      # int32 (nplanes, ny, nx) context bit planes
    err: np.ndarray | None
    variances: dict[str, np.ndarray] = field(default_factory=dict)
    pointings: int = 0
    exposure_time: float = 0.0
    start_time: float | None = None
    end_time: float | None = None
    duration: float = 0.0
    measurement_time: float | None = None


@numba.njit(cache=True, nogil=True)
def _accumulate_variance(var_rn: np.ndarray, variances: tuple, wsums: tuple, wts: tuple,
                         exptime_weight: float, use_ivm: bool) -> None:  # pragma: no cover - numba
    """Per output pixel: w = 1/var_rnoise (ivm) or the exposure time; for each variance v finite
    and >= 0: wsum += v w^2 (NaN wsum counts as 0), wt += w. float64 arithmetic, float32 storage."""
    ny, nx = var_rn.shape
    for k in range(len(variances)):
        var, wsum, wt = variances[k], wsums[k], wts[k]
        for i in range(ny):
            for j in range(nx):
                if use_ivm:
                    rn = var_rn[i, j]
                    if rn > 0 and np.isfinite(rn):
                        w = np.float64(np.float32(1.0) / rn)
                    else:
                        w = 0.0
                else:
                    w = exptime_weight
                v = var[i, j]
                if v >= 0 and np.isfinite(v) and w > 0:
                    s = wsum[i, j]
                    base = 0.0 if np.isnan(s) else np.float64(s)
                    wsum[i, j] = np.float32(base + np.float64(v) * w * w)
                    wt[i, j] = np.float32(np.float64(wt[i, j]) + w)


class MosaicAccumulator:
    """Drizzle exposures onto one grid, one at a time (jwst's ``ResampleImage`` many-to-one).

    Holds the output SCI/WHT/CON arrays and, with ``enable_var``, two running float32 sums per
    variance; each :meth:`add` needs only that input's arrays. ``compute_err`` is "from_var"
    (ERR from the resampled variances, jwst's default) or None.
    """

    def __init__(self, grid: OutputGrid, *, n_inputs: int, pixfrac: float = 1.0, kernel: str = "square",
                 fillval: str | float = "NAN", weight_type: str | None = "ivm", good_bits: int | str | None = GOOD_BITS,
                 enable_ctx: bool = True, enable_var: bool = True, compute_err: str | None = "from_var",
                 chunk_pixels: int = PIXMAP_CHUNK_PIXELS) -> None:
        from drizzle.resample import Drizzle  # noqa: PLC0415

        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
        if weight_type not in WEIGHT_TYPES:
            raise ValueError(f"unknown weight_type {weight_type!r}; expected one of {WEIGHT_TYPES}")
        if not 0.0 < pixfrac <= 1.0:
            raise ValueError(f"pixfrac must be in (0, 1], got {pixfrac}")
        if compute_err not in ("from_var", None):
            raise ValueError(f"compute_err must be 'from_var' or None, got {compute_err!r}")
        self.grid = grid
        self.pixfrac, self.kernel, self.fillval = pixfrac, kernel, fillval
        self.weight_type, self.good_bits = weight_type, good_bits
        self.enable_var = enable_var or compute_err == "from_var"
        self.compute_err = compute_err
        self.chunk_pixels = chunk_pixels
        self._driz = Drizzle(kernel=kernel, fillval=fillval, out_shape=grid.shape, exptime=0.0, begin_ctx_id=0,
                             max_ctx_id=max(0, n_inputs - 1), disable_ctx=not enable_ctx)
        shape = grid.shape
        self._wsum = {n: np.full(shape, np.nan, np.float32) for n in VARIANCE_NAMES} if self.enable_var else {}
        self._wt = {n: np.zeros(shape, np.float32) for n in VARIANCE_NAMES} if self.enable_var else {}
        self._scratch: tuple[np.ndarray, np.ndarray] | None = None
        self._rn: np.ndarray | None = None
        self._groups: list[str] = []
        self._starts: list[float] = []
        self._ends: list[float] = []
        self._exptime = self._duration = self._tmeasure = 0.0
        self._tmeasure_known: list[bool] = []
        self.n_added = 0

    def add(self, image: ResampleInput, pixmap: np.ndarray | None = None) -> None:
        """Drizzle one exposure (and its variances) onto the grid; ``pixmap`` (input pixel -> grid
        pixel, :func:`full_pixel_map`) is computed from the WCSs when not given."""
        data = np.asarray(image.sci, dtype=np.float32)
        if data.ndim != 2:
            raise ValueError(f"{image.name or 'input'}: resample needs a 2-D image, got shape {data.shape}")
        if image.times.exposure_time is None or image.times.exposure_time <= 0:
            raise ValueError(f"{image.name or 'input'}: exposure time must be positive")
        if pixmap is None:
            pixmap = full_pixel_map(image.wcs, self.grid.wcs, data.shape, self.chunk_pixels)
        wvar = image.weighting_var if image.weighting_var is not None and self.weight_type in IVM_TYPES \
            else weighting_variance(image.var_rnoise, self.weight_type)   # one smoothing weighs both
        weight = drizzle_weight(image.dq, wvar, "ivm" if wvar is not None else self.weight_type, self.good_bits,
                                image.times.weight_time())
        if not image.sky_subtracted and image.sky_level is not None:
            data = data - float(image.sky_level)
        kwargs = self._add_kwargs(image, data.shape, pixmap, weight)
        self._driz.add_image(data, **kwargs)
        del data
        if self.enable_var:
            self._add_variances(image, kwargs, wvar)
        self._update_times(image)
        self.n_added += 1

    def _add_kwargs(self, image: ResampleInput, shape: tuple[int, int], pixmap: np.ndarray,
                    weight: np.ndarray) -> dict[str, Any]:
        xmin, xmax, ymin, ymax = resample_range(shape, image.wcs.bounding_box)
        return {"exptime": image.times.exposure_time, "pixmap": pixmap, "pixel_scale_ratio": self.grid.pixel_scale_ratio,
                "iscale": 1.0, "weight_map": weight, "wht_scale": 1.0, "pixfrac": self.pixfrac, "in_units": "cps",
                "xmin": xmin, "xmax": xmax, "ymin": ymin, "ymax": ymax}

    def _add_variances(self, image: ResampleInput, kwargs: Mapping[str, Any], wvar: np.ndarray | None) -> None:
        """Drizzle sqrt(var) of each variance, square it and add it to the running sums, one
        variance at a time. ivm: the resampled ``wvar`` (:func:`weighting_variance`; VAR_RNOISE
        itself for "ivm") weights them, as it weighted the science."""
        ivm = self.weight_type in IVM_TYPES
        if ivm and (wvar is None or wvar.shape != image.sci.shape):
            return   # stcal cannot weight without VAR_RNOISE: nothing accumulated
        rn = None
        if ivm and wvar is not image.var_rnoise:
            rn = self._rn_buffer()
            rn[...] = self._drizzle_variance(wvar, kwargs)
        for name in VARIANCE_NAMES:
            var = getattr(image, name)
            if var is None or var.shape != image.sci.shape:
                continue
            img = self._drizzle_variance(var, kwargs)
            if ivm and rn is None:          # "ivm": the resampled VAR_RNOISE (drizzled first) weights all
                rn = self._rn_buffer()
                rn[...] = img
            _accumulate_variance(rn if ivm else img, (img,), (self._wsum[name],), (self._wt[name],),
                                 float(image.times.weight_time()), ivm)

    def _drizzle_variance(self, var: np.ndarray, kwargs: Mapping[str, Any]) -> np.ndarray:
        """A variance resampled as jwst does: sqrt(var) drizzled, squared (in a reused buffer)."""
        from drizzle.resample import Drizzle  # noqa: PLC0415

        img, wht = self._scratch_arrays()
        driz = Drizzle(out_shape=self.grid.shape, kernel=self.kernel, fillval=np.nan, disable_ctx=True,
                       out_img=img, out_wht=wht)
        driz.add_image(data=np.sqrt(var), **kwargs)
        np.square(img, out=img)
        return img

    def _rn_buffer(self) -> np.ndarray:
        if self._rn is None:
            self._rn = np.empty(self.grid.shape, np.float32)
        return self._rn

    def _scratch_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Reused (NaN image, zero weight) output buffers for the variance drizzles."""
        if self._scratch is None:
            self._scratch = (np.empty(self.grid.shape, np.float32), np.empty(self.grid.shape, np.float32))
        img, wht = self._scratch
        img.fill(np.nan)
        wht.fill(0.0)
        return img, wht

    def _update_times(self, image: ResampleInput) -> None:
        if image.group_id in self._groups:
            return
        self._groups.append(image.group_id)
        t = image.times
        self._starts.append(t.start_time)
        self._ends.append(t.end_time)
        self._exptime += t.exposure_time
        self._tmeasure_known.append(t.measurement_time is not None)
        self._tmeasure += t.weight_time()
        self._duration += t.duration or 0.0

    def finalize(self) -> Mosaic:
        """The co-added image; the accumulator must not be used afterwards."""
        if self.n_added == 0:
            raise ValueError("nothing was added to the mosaic")
        driz = self._driz
        self._scratch = self._rn = None
        variances: dict[str, np.ndarray] = {}
        err = None
        if self.enable_var:
            scaling = 1.0 / self.grid.pixel_scale_ratio ** 2
            with np.errstate(invalid="ignore", divide="ignore"):
                for name in VARIANCE_NAMES:
                    wsum, wt = self._wsum.pop(name), self._wt.pop(name)
                    variances[name] = (wsum * scaling / wt / wt).astype(np.float32)
                    del wsum, wt
            if self.compute_err == "from_var":
                err = error_from_variances([variances[n] for n in VARIANCE_NAMES])
        starts = [s for s in self._starts if s is not None]
        ends = [e for e in self._ends if e is not None]
        return Mosaic(self.grid, driz.out_img, driz.out_wht, driz.out_ctx, err, variances, len(self._groups), self._exptime,
                      min(starts) if starts else None, max(ends) if ends else None, self._duration,
                      self._tmeasure if all(self._tmeasure_known) else None)


def error_from_variances(variances: Sequence[np.ndarray], chunk_pixels: int = PIXMAP_CHUNK_PIXELS) -> np.ndarray:
    """float32 sqrt(nansum(variances)) in row chunks; NaN where every variance is NaN."""
    shape = variances[0].shape
    err = np.empty(shape, np.float32)
    for rows in row_chunks(shape[0], shape[1] if len(shape) > 1 else 1, chunk_pixels):
        total = np.zeros(err[rows].shape, np.float32)
        all_nan = np.ones(err[rows].shape, bool)
        for var in variances:
            block = var[rows]
            nan = np.isnan(block)
            total += np.where(nan, np.float32(0), block)
            all_nan &= nan
        out = np.sqrt(total)
        out[all_nan] = np.nan
        err[rows] = out
    return err


def resample_range(shape: tuple[int, int], bbox: Any = None) -> tuple[int, int, int, int]:
    """(xmin, xmax, ymin, ymax) input pixels to drizzle: the bounding box clipped to the array."""
    if bbox is None:
        return 0, max(shape[1] - 1, 0), 0, max(shape[0] - 1, 0)
    try:
        bbox = bbox.bounding_box(order="F")
    except AttributeError:
        pass
    (x1, x2), (y1, y2) = bbox
    xmin, ymin = max(0, int(x1 + 0.5)), max(0, int(y1 + 0.5))
    xmax = max(xmin, min(shape[1] - 1, int(x2 + 0.5)))
    ymax = max(ymin, min(shape[0] - 1, int(y2 + 0.5)))
    return xmin, xmax, ymin, ymax


__all__ = [
    "ExposureTimes", "GOOD_BITS", "KERNELS", "Mosaic", "MosaicAccumulator", "OutputGrid", "PixmapCache", "ResampleInput",
    "WcsReference", "bad_bits", "blot", "compute_scale", "drizzle_weight", "error_from_variances",
    "fiducial_of", "footprint", "full_pixel_map", "good_pixel_mask", "mean_pixel_area", "output_grid",
    "pixel_map", "resample_range", "rotation_matrix", "row_chunks", "spherical_polygon_area",
]
