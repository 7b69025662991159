"""Sky matching for imaging: jwst's ``skymatch`` step (stcal.skymatch), streamed.

Methods (``skymethod``): ``"local"`` (each image's own sky), ``"global"`` (the smallest of those,
for every image), ``"match"`` (sky *differences* from the overlaps of image pairs, solved in the
least-squares sense; the lowest becomes 0 with ``match_down``), ``"global+match"`` (match, then the
global minimum of what remains), ``"user"`` (values from a file).

The statistic (``skystat`` "mode" | "median" | "midpt" | "mean", ``lower``/``upper`` limits,
``nclip`` iterations of ``lsigma``/``usigma`` clipping, ``binwidth`` in sigma for the histogram
statistics) reproduces ``stsci.imagestats.ImageStats`` (float32 arithmetic and IRAF histogram
conventions included).

Streaming: each image is read once. :func:`measure_image` computes, from that image alone, its
whole-image statistic and its statistic inside the overlap with every other image (the other
image's bounding polygon mapped into this image's pixels, clipped to its edges and rasterized as
jwst's does); :func:`solve_sky` then combines the small per-pair numbers into one level per image.
Images of one exposure group (detectors of the same exposure) are matched together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numba
import numpy as np

from .resample import good_pixel_mask

SKYMETHODS = ("local", "global", "match", "global+match", "user")
SKYSTATS = ("median", "midpt", "mean", "mode")
GOOD_BITS = "~DO_NOT_USE+NON_SCIENCE"
_FLT_EPS = float(np.finfo(np.float32).eps)


# ---------------------------------------------------------------------------------------------
# Statistics (stsci.imagestats.ImageStats)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SkyStats:
    """Sky statistic settings (jwst SkyMatchStep names and defaults)."""

    skystat: str = "mode"
    lower: float | None = None
    upper: float | None = None
    nclip: int = 5
    lsigma: float = 4.0
    usigma: float = 4.0
    binwidth: float = 0.1

    def __post_init__(self) -> None:
        if self.skystat not in SKYSTATS:
            raise ValueError(f"skystat must be one of {SKYSTATS}, got {self.skystat!r}")
        if self.nclip < 0 or self.lsigma <= 0 or self.usigma <= 0 or self.binwidth <= 0:
            raise ValueError("nclip must be >= 0 and lsigma, usigma, binwidth > 0")

    def __call__(self, values: np.ndarray) -> tuple[float, int]:
        """(statistic, pixels used) of the 1-D ``values``; ValueError when none are usable."""
        return image_statistic(values, self)


@numba.njit(cache=True, nogil=True)
def _clipped_moments(values: np.ndarray, clipmin: np.float32, clipmax: np.float32):  # pragma: no cover
    """imagestats' computeMean: (n, mean, stddev, min, max) of values in [clipmin, clipmax]
    (float32 values, double sums, float32 results; its min/max start from values[0])."""
    first = values[0]
    vmin = clipmin if clipmin > first else first
    vmax = clipmax if clipmax < first else first
    n = 0
    total = 0.0
    for v in values:
        if v >= clipmin and v <= clipmax:
            if v <= vmin:
                vmin = v
            if v >= vmax:
                vmax = v
            n += 1
            total += v
    mean = np.float32(total / n) if n > 0 else np.float32(np.nan)
    sumdiff = 0.0
    for v in values:
        if v >= vmin and v <= vmax:
            d = np.float32(v - mean)
            sumdiff += np.float32(d * d)
    std = np.float32(math.sqrt(sumdiff / (n - 1))) if n > 1 else np.float32(np.nan)
    return n, mean, std, vmin, vmax


@numba.njit(cache=True, nogil=True)
def _histogram(values: np.ndarray, nbins: int, bin_width: np.float32, min_value: np.float32,
               max_value: np.float32) -> np.ndarray:  # pragma: no cover - numba
    """imagestats' populate1DHist (float32 binning, top edge rule)."""
    hist = np.zeros(nbins, np.uint32)
    f = np.float32(1.0) / bin_width
    edge = np.float32(min_value + np.float32(bin_width * np.float32(nbins)))
    allow_max_eq = int(np.float32(f * np.float32(edge - min_value))) == nbins
    if allow_max_eq:
        edge = np.float32(edge * np.float32(1.0 - np.finfo(np.float32).eps))
    if max_value > edge:
        max_value = edge
    for v in values:
        if v >= min_value and (v <= max_value if allow_max_eq else v < max_value):
            idx = int(np.float32(f * np.float32(v - min_value)))
            hist[min(max(idx, 0), nbins - 1)] += 1
    return hist


def image_statistic(values: np.ndarray, stats: SkyStats) -> tuple[float, int]:
    """``stats.skystat`` of ``values`` after ``nclip`` sigma-clipping iterations, and the number of
    values used (ImageStats semantics; the histogram statistics bin ALL values in the clipped range).
    """
    data = np.ascontiguousarray(np.ravel(values), dtype=np.float32)
    if data.size == 0:
        raise ValueError("no data for sky statistics")
    gmin, gmax = float(data.min()), float(data.max())
    lower = gmin if stats.lower is None else stats.lower
    upper = gmax if stats.upper is None else stats.upper
    if stats.lower is not None and (lower > gmax or (stats.upper is not None and lower > upper)):
        raise ValueError("lower sky limit above the data")
    if stats.upper is not None and upper < gmin:
        raise ValueError("upper sky limit below the data")
    clipmin, clipmax = lower, upper
    for it in range(stats.nclip + 1):
        n, mean, std, vmin, vmax = _clipped_moments(data, np.float32(clipmin), np.float32(clipmax))
        if n <= 0:
            raise ValueError("no pixels left within the sky clipping limits")
        mean, std, vmin, vmax = float(mean), float(std), float(vmin), float(vmax)
        if it < stats.nclip:
            clipmin = max(lower, mean - stats.lsigma * std)
            clipmax = min(upper, mean + stats.usigma * std)
    if stats.skystat == "mean":
        return mean, n
    if stats.skystat == "median":
        used = data[(data <= np.float32(clipmax)) & (data >= np.float32(clipmin))] if stats.nclip > 0 else data
        return float(np.median(used)), n
    return _histogram_statistic(data, stats, std, vmin, vmax), n


def _histogram_statistic(data: np.ndarray, stats: SkyStats, std: float, vmin: float, vmax: float) -> float:
    hwidth = stats.binwidth * std
    drange = vmax - vmin
    tiny = 10.0 * _FLT_EPS
    if hwidth < tiny or abs(drange) < tiny or hwidth > drange:
        nbins, dz = 1, drange
    else:
        nbins = int((vmax - vmin) / hwidth) + 1
        dz = float(vmax - vmin) / float(nbins - 1)
    width, zero = np.float32(dz), np.float32(vmin)
    bins = _histogram(data, nbins, width, zero, np.float32(zero + width * nbins))
    if stats.skystat == "mode":
        return _mode(bins, nbins, vmin, hwidth)
    return _midpt(bins, vmin, hwidth)


def _mode(bins: np.ndarray, nbins: int, vmin: float, hwidth: float) -> float:
    """Histogram peak refined by parabolic interpolation (ImageStats' mode)."""
    if nbins == 1:
        return vmin + 0.5 * hwidth
    if nbins == 2:
        if bins[0] > bins[1]:
            return vmin + 0.5 * hwidth
        return vmin + 1.5 * hwidth if bins[0] < bins[1] else vmin + hwidth
    peak = int(np.argmax(bins))
    if peak == 0:
        return vmin + 0.5 * hwidth
    if peak == nbins - 1:
        return vmin + (nbins - 0.5) * hwidth
    dh1 = int(bins[peak]) - int(bins[peak - 1])
    dh2 = int(bins[peak]) - int(bins[peak + 1])
    if dh1 + dh2 == 0:
        return vmin + (peak + 0.5) * hwidth
    mode = peak + 1 + 0.5 * (dh1 - dh2) / (dh1 + dh2)
    return vmin + (mode - 0.5) * hwidth


def _midpt(bins: np.ndarray, vmin: float, hwidth: float) -> float:
    """IRAF's histogram pseudo-median (ImageStats' midpt)."""
    if bins.size <= 1:
        return float(bins[0])
    cum = np.cumsum(bins).astype(np.float32)
    cum = cum / cum[-1]
    lo = int(np.flatnonzero(cum >= 0.5)[0])
    h1 = np.float64(vmin + lo * hwidth)    # float64 + float32 terms below, as ImageStats
    hdiff = cum[lo] if lo == 0 else cum[lo] - cum[lo - 1]
    if hdiff == 0:
        return h1
    if lo == 0:
        return float(h1 + 0.5 / hdiff * hwidth)
    return float(h1 + (0.5 - cum[lo - 1]) / hdiff * hwidth)


# ---------------------------------------------------------------------------------------------
# Footprints and overlaps
# ---------------------------------------------------------------------------------------------

def bounding_polygon(wcs: Any, shape: tuple[int, int], stepsize: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Closed outline (RA, Dec arrays, deg) of an image through its pixel-edge border; vertices
    at most ``stepsize`` pixels apart (corners only when None)."""
    ny, nx = shape
    nint_x = 2 if stepsize is None else max(2, int(np.ceil((nx + 1.0) / stepsize)))
    nint_y = 2 if stepsize is None else max(2, int(np.ceil((ny + 1.0) / stepsize)))
    xs = np.linspace(-0.5, nx - 0.5, nint_x)
    ys = np.linspace(-0.5, ny - 0.5, nint_y)[1:-1]
    x = np.concatenate([xs, np.full(ys.size, nx - 0.5), xs[::-1], np.full(ys.size, -0.5), xs[:1]])
    y = np.concatenate([np.full(xs.size, -0.5), ys, np.full(xs.size, ny - 0.5), ys[::-1], [-0.5]])
    ra, dec = wcs(x, y, with_bounding_box=False)
    ra, dec = np.asarray(ra, float), np.asarray(dec, float)
    ra[-1], dec[-1] = ra[0], dec[0]
    return ra, dec


def clip_to_image(x: np.ndarray, y: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(N, 2) vertices of polygon (x, y) clipped to the image's pixel-edge rectangle
    (Sutherland-Hodgman); empty when they do not overlap."""
    ny, nx = shape
    poly = [(float(a), float(b)) for a, b in zip(x, y)]
    if len(poly) > 1 and poly[0] == poly[-1]:
        poly = poly[:-1]
    for axis, bound, keep_low in ((0, -0.5, False), (0, nx - 0.5, True), (1, -0.5, False), (1, ny - 0.5, True)):
        poly = _clip_half_plane(poly, axis, bound, keep_low)
        if not poly:
            break
    return np.array(poly, dtype=float).reshape(-1, 2)


def _clip_half_plane(poly: list[tuple[float, float]], axis: int, bound: float, keep_low: bool
                     ) -> list[tuple[float, float]]:
    def inside(p: tuple[float, float]) -> bool:
        return p[axis] <= bound if keep_low else p[axis] >= bound

    out: list[tuple[float, float]] = []
    for i, cur in enumerate(poly):
        prev = poly[i - 1]
        if inside(cur):
            if not inside(prev):
                out.append(_crossing(prev, cur, axis, bound))
            out.append(cur)
        elif inside(prev):
            out.append(_crossing(prev, cur, axis, bound))
    return out


def _crossing(a: tuple[float, float], b: tuple[float, float], axis: int, bound: float) -> tuple[float, float]:
    t = (bound - a[axis]) / (b[axis] - a[axis])
    p = (a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1]))
    return (bound, p[1]) if axis == 0 else (p[0], bound)


def polygon_area(vertices: np.ndarray) -> float:
    """Area [pixel^2] of a polygon given as (N, 2) vertices (shoelace)."""
    if len(vertices) < 3:
        return 0.0
    x, y = vertices[:, 0], vertices[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def polygon_mask(vertices: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """bool ``shape``: pixels inside the polygon, rasterized as jwst does (gwcs region scan)."""
    from gwcs import region  # noqa: PLC0415

    mask = np.zeros(shape, dtype=bool)
    if len(vertices) < 3:
        return mask
    closed = [tuple(v) for v in vertices] + [tuple(vertices[0])]
    return region.Polygon(True, closed).scan(mask)


# ---------------------------------------------------------------------------------------------
# Per-image measurements and the solution
# ---------------------------------------------------------------------------------------------

@dataclass
class SkyMeasurement:
    """One image's sky numbers: whole image, and inside its overlap with each other group."""

    full: tuple[float, int] | None
    overlaps: dict[int, tuple[float, int]] = field(default_factory=dict)   # other group -> (sky, npix)


def sky_mask(sci: np.ndarray, dq: np.ndarray, dqbits: int | str | None = GOOD_BITS) -> np.ndarray:
    """bool (ny, nx): finite pixels without bad DQ bits (jwst's skymatch mask)."""
    good = np.isfinite(sci)
    if dqbits is not None:
        good &= good_pixel_mask(dq, dqbits).astype(bool)
    return good


Polygon = tuple[np.ndarray, np.ndarray]


def measure_image(sci: np.ndarray, good: np.ndarray, wcs: Any, others: Mapping[int, Sequence[Polygon]],
                  stats: SkyStats, *, whole_image: bool = True) -> SkyMeasurement:
    """Sky of one image (``sci`` (ny, nx), ``good`` mask) overall and inside each other group.

    ``others`` maps a group index to the bounding polygons (RA, Dec arrays; see
    :func:`bounding_polygon`) of its images; the overlap is the union of this image's pixels inside
    them. Groups without overlapping good pixels are left out.
    """
    full = _statistic(sci[good], stats) if whole_image else None
    overlaps: dict[int, tuple[float, int]] = {}
    for group, polygons in others.items():
        mask = np.zeros(sci.shape, dtype=bool)
        for ra, dec in polygons:
            x, y = wcs.invert(ra, dec, with_bounding_box=False)
            clipped = clip_to_image(np.asarray(x), np.asarray(y), sci.shape)
            if polygon_area(clipped) > 0.0:
                mask |= polygon_mask(clipped, sci.shape)
        mask &= good
        value = _statistic(sci[mask], stats)
        if value is not None:
            overlaps[group] = value
    return SkyMeasurement(full, overlaps)


def _statistic(values: np.ndarray, stats: SkyStats) -> tuple[float, int] | None:
    if values.size < 1:
        return None
    try:
        sky, npix = stats(values)
    except ValueError:
        return None
    return (float(sky), int(npix)) if np.isfinite(sky) else None


@dataclass
class SkySolution:
    """Sky level per image (same units as the data) and whether it could be computed."""

    levels: list[float]
    valid: list[bool]


def group_measurements(measurements: Sequence[SkyMeasurement], groups: Sequence[int]
                       ) -> tuple[list[tuple[float, int] | None], dict[tuple[int, int], tuple[float, int]]]:
    """Per group: the whole-group sky (the smallest member sky) and {(g, h): sky of group g inside
    group h}, the members' overlap skies weighted by their pixel counts (stcal's SkyGroup)."""
    full: list[tuple[float, int] | None] = [None] * (max(groups) + 1)
    sums: dict[tuple[int, int], list[float]] = {}
    for m, g in zip(measurements, groups):
        if m.full is not None and (full[g] is None or m.full[0] < full[g][0]):
            full[g] = m.full
        for h, (sky, npix) in m.overlaps.items():
            if h != g and npix > 0:
                acc = sums.setdefault((g, h), [0.0, 0])
                acc[0] += sky * npix
                acc[1] += npix
    pairs = {key: (s / n, int(n)) for key, (s, n) in sums.items() if n > 0}
    return full, pairs


def solve_sky(measurements: Sequence[SkyMeasurement], *, skymethod: str = "match", match_down: bool = True,
              groups: Sequence[int] | None = None) -> SkySolution:
    """Sky level of every image from its :class:`SkyMeasurement` (stcal's ``skymatch``)."""
    if skymethod not in SKYMETHODS or skymethod == "user":
        raise ValueError(f"skymethod must be one of {SKYMETHODS[:-1]}, got {skymethod!r}")
    n = len(measurements)
    if n == 0:
        raise ValueError("no images to sky-match")
    groups = list(range(n)) if groups is None else list(groups)
    full, pairs = group_measurements(measurements, groups)
    ng = len(full)
    sky = [0.0] * ng
    valid = [False] * ng
    if "match" in skymethod:
        deltas = match_deltas(pairs, ng)
        good = np.isfinite(deltas)
        if np.any(good):
            deltas[good] -= np.amin(deltas[good]) if match_down else np.amax(deltas[good])
        for g in range(ng):
            valid[g] = bool(good[g])
            sky[g] += float(deltas[g]) if good[g] else 0.0
    if "global" in skymethod or "match" not in skymethod:
        local = [None if full[g] is None else full[g][0] - sky[g] for g in range(ng)]
        if "global" in skymethod:
            known = [v for v in local if v is not None]
            minsky = min(known) if known else None
            for g in range(ng):
                if minsky is not None:
                    sky[g] += minsky
                    valid[g] = True
        else:
            for g in range(ng):
                valid[g] = local[g] is not None
                sky[g] += local[g] if local[g] is not None else 0.0
    return SkySolution([sky[groups[i]] for i in range(n)], [valid[groups[i]] for i in range(n)])


def match_deltas(pairs: Mapping[tuple[int, int], tuple[float, int]], n: int) -> np.ndarray:
    """Least-squares sky differences (float64 (n,); NaN for images in no valid overlap).

    One equation per pair (i, j) measured both ways: w (d_i - d_j) = w (s_i|j - s_j|i), with
    w the mean of the two pixel counts (stcal's ``_find_optimum_sky_deltas``).
    """
    rows, rhs = [], []
    used = np.zeros(n, bool)
    for i in range(n):
        for j in range(i + 1, n):
            a, b = pairs.get((i, j)), pairs.get((j, i))
            if a is None or b is None or a[1] <= 0 or b[1] <= 0:
                continue
            w = 0.5 * (a[1] + b[1])
            row = np.zeros(n)
            row[i], row[j] = w, -w
            rows.append(row)
            rhs.append(w * (a[0] - b[0]))
            used[i] = used[j] = True
    if not rows:
        return np.full(n, np.nan)
    k = np.array(rows)
    deltas = np.linalg.pinv(k, rcond=1.0e-12) @ np.array(rhs)
    deltas[~used] = np.nan
    return deltas


def read_skylist(path: str | Path, names: Sequence[str]) -> list[float]:
    """User sky values (``skymethod="user"``): lines ``<file name> <sky>``, matched to ``names``
    by file stem without its suffix (``x_cal.fits`` matches ``x_crf.fits``)."""
    table: dict[str, float] = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and not parts[0].startswith("#"):
            table[_stem(parts[0])] = float(parts[1])
    if len(table) != len(names):
        raise ValueError(f"skylist {path} has {len(table)} entries for {len(names)} images")
    missing = [n for n in names if _stem(n) not in table]
    if missing:
        raise ValueError(f"skylist {path} has no value for {', '.join(missing)}")
    return [table[_stem(n)] for n in names]


def _stem(name: str) -> str:
    stem = Path(name).name.split(".")[0]
    base, _, last = stem.rpartition("_")
    return base if base else stem


__all__ = [
    "GOOD_BITS", "Polygon", "SKYMETHODS", "SKYSTATS", "SkyMeasurement", "SkySolution", "SkyStats", "bounding_polygon",
    "clip_to_image", "group_measurements", "image_statistic", "match_deltas", "measure_image", "polygon_area",
    "polygon_mask", "read_skylist", "sky_mask", "solve_sky",
]
