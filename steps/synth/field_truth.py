"""Check calwebb_image3 products of a synthetic field (:mod:`.field`) against its truth.

:func:`evaluate_image3` measures, from the crf / i2d / cat / segm products and the truth JSON:

* alignment: for each exposure, the largest sky offset over a pixel grid between the tweaked WCS
  of its crf product and the TRUE WCS the exposure was rendered with;
* catalog positions: offsets of catalog sources from the true positions of isolated stars
  and galaxies (all stars too, for information);
* photometry: catalog flux / expected flux of isolated stars (isophotal and aper_total); the
  expectation of each exposure weighted as the mosaic weights them (1 / median VAR_RNOISE); the
  2% check takes the stars measured with SNR >= 200 (aper_total, a 70%-EE aperture times its
  correction, varies by a few % with the pixel phase of these undersampled PSFs: reported only);
* cosmic rays that survived stage 1 (truth, snr >= ``cr_snr``): the fraction flagged OUTLIER in
  the crf DQ (hits another exposure also took within 2 pixels are counted apart: a median of four
  exposures two of which were hit holds the hit and cannot reveal it), every hit on empty sky and
  at least 95% of those on sources (a hit on the steep flank of an undersampled source can stay
  within outlier detection's derivative allowance), and, for those on empty sky, what remains in
  the mosaic (3x3 sum above the local sky) compared with what a leaked hit would leave (its
  excess x its exposure's weight fraction);
* flux conservation: the sky-subtracted mosaic flux over the area every exposure covers
  (sky: a quadratic surface fitted to source-free pixels) / the summed expected flux of the
  sources there.

:meth:`Image3Truth.criteria` turns the numbers into the issue's pass/fail checks.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..dqflags import DO_NOT_USE, OUTLIER
from ..tweakreg import separation_arcsec
from .detector import FULL_SIZE, REF_BORDER, detector_info, subarray_for
from .field import FieldPointing, true_wcs
from .stage2 import stage2_name

#: the issue's limits
MAX_ALIGNMENT_ARCSEC = 0.02
MAX_POSITION_ARCSEC = 0.05
MAX_STAR_FLUX_ERROR = 0.02
#: stars whose isophotal flux is measured to better than 0.5% (noise) enter the 2% check
STAR_FLUX_MIN_SNR = 200.0
MAX_TOTAL_FLUX_ERROR = 0.005
MIN_CR_FLAGGED_FRACTION = 1.0
#: on a source the derivative allowance of outlier detection (scale x |gradient| of the blotted
#: median) can hide a hit on a steep, undersampled flank: nearly all, not all, are flagged there
MIN_CR_ON_SOURCE_FLAGGED_FRACTION = 0.95
MAX_CR_RESIDUAL_FRACTION = 0.1


@dataclass
class Image3Truth:
    """Measured numbers (see the module doc); arcsec, ratios, counts."""

    alignment_arcsec: list[float] = field(default_factory=list)       # per exposure, max over the grid
    tweak_status: list[str] = field(default_factory=list)
    position_arcsec_isolated: list[float] = field(default_factory=list)
    position_arcsec_stars: list[float] = field(default_factory=list)
    n_unmatched_isolated: int = 0
    star_flux_ratio_isophotal: list[float] = field(default_factory=list)
    star_flux_ratio_total: list[float] = field(default_factory=list)
    star_flux_snr: list[float] = field(default_factory=list)            # isophotal flux / its error
    n_cr_tested: int = 0
    n_cr_coincident: int = 0        # not tested: another exposure hit within 2 pixels (see module doc)
    n_cr_on_source_tested: int = 0  # of n_cr_tested: on a source (within 1" + 7 half-light radii)
    n_cr_on_source_flagged: int = 0
    n_cr_flagged: int = 0
    n_cr_sky_tested: int = 0
    cr_residual_fraction: float = math.nan      # sum(remaining) / sum(leak if unflagged)
    cr_max_residual_sigma: float = math.nan
    cr_leak_median_sigma: float = math.nan      # how detectable a leak would be
    total_flux_ratio: float = math.nan
    total_flux_expected_jy: float = math.nan
    n_sources_in_total: int = 0
    weights: list[float] = field(default_factory=list)

    def criteria(self) -> dict[str, tuple[float, float, bool]]:
        """name -> (measured, limit, passed)."""
        def worst(values, default=math.inf):
            return float(np.max(values)) if len(values) else default

        bright = np.asarray(self.star_flux_snr) >= STAR_FLUX_MIN_SNR
        iso = np.abs(np.asarray(self.star_flux_ratio_isophotal)[bright] - 1.0)
        sky_tested = self.n_cr_tested - self.n_cr_on_source_tested
        sky_flagged = self.n_cr_flagged - self.n_cr_on_source_flagged
        flagged_sky = sky_flagged / sky_tested if sky_tested else math.nan
        flagged_on_source = (self.n_cr_on_source_flagged / self.n_cr_on_source_tested
                             if self.n_cr_on_source_tested else 1.0)
        rows = {
            "alignment_max_arcsec": (worst(self.alignment_arcsec), MAX_ALIGNMENT_ARCSEC, "<"),
            "catalog_position_max_arcsec": (worst(self.position_arcsec_isolated), MAX_POSITION_ARCSEC, "<"),
            "isolated_star_flux_max_error": (worst(iso), MAX_STAR_FLUX_ERROR, "<"),
            "surviving_cr_flagged_fraction_sky": (flagged_sky, MIN_CR_FLAGGED_FRACTION, ">="),
            "surviving_cr_flagged_fraction_on_sources": (flagged_on_source, MIN_CR_ON_SOURCE_FLAGGED_FRACTION, ">="),
            "surviving_cr_residual_fraction": (self.cr_residual_fraction, MAX_CR_RESIDUAL_FRACTION, "<"),
            "total_flux_error": (abs(self.total_flux_ratio - 1.0), MAX_TOTAL_FLUX_ERROR, "<"),
        }
        return {k: (v, lim, bool(v < lim) if op == "<" else bool(v >= lim)) for k, (v, lim, op) in rows.items()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_image3(truth_path: str | Path, products: Mapping[str, Path], crds_root: str | Path, *,
                    cr_snr: float = 10.0, weights: list[float] | None = None) -> Image3Truth:
    """Compare the products of calwebb_image3 (``products``: kind -> path with "i2d", "cat",
    "segm" and "crf:<name>" entries) with the truth of the field at ``truth_path``. ``weights``:
    the exposures' relative weights in the mosaic (default: 1 / median VAR_RNOISE, as ivm)."""
    from astropy.table import QTable  # noqa: PLC0415
    from stdatamodels.jwst import datamodels  # noqa: PLC0415

    truth = json.loads(Path(truth_path).read_text())
    folder = Path(truth_path).parent
    result = Image3Truth()
    wcss = _true_wcss(truth, Path(crds_root))
    crfs = _crf_paths(truth, products)
    result.weights = list(weights) if weights is not None else _exposure_weights(folder, truth)
    expected = _weighted_expectations(truth, result.weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        i2d = datamodels.open(products["i2d"])
    cr_rows: list[tuple[float, float, float]] = []
    try:
        for k, exp in enumerate(truth["exposures"]):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                crf = datamodels.open(crfs[k])
            try:
                result.alignment_arcsec.append(_max_offset(crf.meta.wcs, wcss[k], crf.data.shape))
                result.tweak_status.append(str(crf.meta.cal_step.tweakreg))
                cr_rows += _check_cosmic_rays(result, exp, crf, i2d, truth, wcss, k, cr_snr)
            finally:
                crf.close()
        _finish_cr_statistics(result, cr_rows)
        catalog = QTable.read(products["cat"])
        _check_catalog(result, catalog, truth, expected)
        segm = np.asarray(datamodels.open(products["segm"]).data)
        _check_total_flux(result, i2d, segm, truth, wcss, expected)
    finally:
        i2d.close()
    return result


# ---------------------------------------------------------------------------------------------

def _true_wcss(truth: Mapping[str, Any], crds_root: Path) -> list[Any]:
    from ..image2 import read_distortion, read_filter_offset  # noqa: PLC0415

    det = truth["detector"]
    refdir = crds_root / "references" / "jwst" / "nircam"
    distortion = read_distortion(str(refdir / stage2_name("distortion", det)))
    offset = read_filter_offset(str(refdir / stage2_name("filteroffset", det)), truth["filter"], truth["pupil"])
    info, sub = detector_info(det), subarray_for(det, truth["subarray"])
    return [true_wcs(FieldPointing(**e["true_pointing"]), distortion, offset, sub, info) for e in truth["exposures"]]


def _crf_paths(truth: Mapping[str, Any], products: Mapping[str, Path]) -> list[Path]:
    crfs = {Path(p).name: Path(p) for k, p in products.items() if k.startswith("crf:")}
    out = []
    for exp in truth["exposures"]:
        stem = exp["cal"].removesuffix("_cal.fits")
        found = [p for name, p in crfs.items() if name.startswith(stem + "_")]
        if len(found) != 1:
            raise ValueError(f"no single crf product for {exp['cal']} among {sorted(crfs)}")
        out.append(found[0])
    return out


def _exposure_weights(folder: Path, truth: Mapping[str, Any]) -> list[float]:
    """1 / median VAR_RNOISE of the good pixels of each cal exposure (ivm weighting)."""
    from astropy.io import fits  # noqa: PLC0415

    out = []
    for exp in truth["exposures"]:
        with fits.open(folder / exp["cal"]) as hdul:
            var = hdul["VAR_RNOISE"].data
            good = ((hdul["DQ"].data & DO_NOT_USE) == 0) & np.isfinite(var) & (var > 0)
            out.append(float(1.0 / np.median(var[good])))
    return out


def _weighted_expectations(truth: Mapping[str, Any], weights: list[float]) -> dict[int, float]:
    """Source id -> expected Jy, each exposure's expectation weighted by its mosaic weight."""
    to_jy = truth["photmjsr"] * 1e6 * truth["pixar_sr"]
    out = {}
    for s in truth["sources"]:
        pairs = [(w, v) for w, v in zip(weights, s["expected_dn_s"]) if v is not None]
        if pairs:
            out[s["id"]] = sum(w * v for w, v in pairs) / sum(w for w, _ in pairs) * to_jy
    return out


def _max_offset(wcs: Any, truth_wcs: Any, shape: tuple[int, int], step: int = 32) -> float:
    ny, nx = shape
    yy, xx = np.mgrid[0:ny:step, 0:nx:step].astype(float)
    ra, dec = wcs(xx, yy, with_bounding_box=False)
    ra0, dec0 = truth_wcs(xx, yy, with_bounding_box=False)
    return float(np.max(separation_arcsec(ra, dec, ra0, dec0)))


def _near_sources(ra: np.ndarray, dec: np.ndarray, truth: Mapping[str, Any], radius_arcsec: float = 1.0) -> np.ndarray:
    """bool per position: within ``radius_arcsec`` (+ 7 half-light radii) of a truth source."""
    src_ra = np.array([s["ra"] for s in truth["sources"]])
    src_dec = np.array([s["dec"] for s in truth["sources"]])
    reach = radius_arcsec + 7.0 * np.array([s["r_eff_arcsec"] for s in truth["sources"]])
    sep = separation_arcsec(np.asarray(ra)[:, None], np.asarray(dec)[:, None], src_ra[None, :], src_dec[None, :])
    return np.any(sep < reach[None, :], axis=1)


def _check_cosmic_rays(result: Image3Truth, exp: Mapping[str, Any], crf: Any, i2d: Any, truth: Mapping[str, Any],
                       wcss: list[Any], k: int, cr_snr: float) -> list[tuple[float, float, float]]:
    """Count OUTLIER flags of exposure ``k``'s surviving hits (snr >= ``cr_snr``, on sky every
    exposure covers) in its crf; return (remaining Jy, its error, Jy a leaked hit would leave) in
    the mosaic for the brightest pixel of each hit on empty sky."""
    from scipy.ndimage import uniform_filter  # noqa: PLC0415

    survivors = [cr for cr in exp["surviving_crs"] if not cr["do_not_use"]]
    if not survivors:
        return []
    ys, xs = (np.array([cr[key] for cr in survivors], int) for key in ("y", "x"))
    ra, dec, snr, excess = (np.array([cr[key] for cr in survivors], float) for key in ("ra", "dec", "snr", "excess_dn_s"))
    dq = np.asarray(crf.dq[ys, xs], np.int64)
    usable = ~(((dq & DO_NOT_USE) != 0) & ((dq & OUTLIER) == 0))
    coincident = _hit_in_another_exposure(ra, dec, truth, k)
    result.n_cr_coincident += int(np.count_nonzero((snr >= cr_snr) & usable & coincident))
    tested = np.flatnonzero((snr >= cr_snr) & usable & ~coincident & _covered_by_all(ra, dec, wcss, truth))
    tested = tested[np.argsort(-excess[tested], kind="stable")]
    result.n_cr_tested += len(tested)
    result.n_cr_flagged += int(np.count_nonzero(dq[tested] & OUTLIER))
    on_source = tested[_near_sources(ra[tested], dec[tested], truth)]
    result.n_cr_on_source_tested += len(on_source)
    result.n_cr_on_source_flagged += int(np.count_nonzero(dq[on_source] & OUTLIER))
    # the excess of every surviving pixel within one pixel (a hit and its neighbour shares)
    image = np.zeros(crf.dq.shape, float)
    np.add.at(image, (ys, xs), excess)
    hit = uniform_filter(image, size=3, mode="constant") * 9.0
    taken = np.zeros(crf.dq.shape, bool)
    weight_fraction = result.weights[k] / sum(result.weights)
    to_jy_out = 1e6 * float(i2d.meta.photometry.pixelarea_steradians)
    to_jy_in = truth["photmjsr"] * 1e6 * truth["pixar_sr"]
    sky = tested[~_near_sources(ra[tested], dec[tested], truth)]
    if not len(sky):
        return []
    out_x, out_y = i2d.meta.wcs.invert(ra[sky], dec[sky], with_bounding_box=False)
    remaining = []
    for i, x, y in zip(sky, np.atleast_1d(out_x), np.atleast_1d(out_y)):
        if taken[ys[i], xs[i]]:
            continue
        taken[max(ys[i] - 3, 0):ys[i] + 4, max(xs[i] - 3, 0):xs[i] + 4] = True
        measured, sigma = _box_excess(i2d.data, i2d.err, float(x), float(y))
        if np.isfinite(measured):
            remaining.append((measured * to_jy_out, sigma * to_jy_out, hit[ys[i], xs[i]] * to_jy_in * weight_fraction))
    return remaining


def _hit_in_another_exposure(ra: np.ndarray, dec: np.ndarray, truth: Mapping[str, Any], k: int,
                             radius_pixels: float = 2.0) -> np.ndarray:
    """True where another exposure has a surviving hit within ``radius_pixels`` on the sky: with
    two of four exposures hit, their median holds the hit too and cannot reveal it."""
    from scipy.spatial import cKDTree  # noqa: PLC0415

    others = [(cr["ra"], cr["dec"]) for j, e in enumerate(truth["exposures"]) if j != k for cr in e["surviving_crs"]]
    if not others or not len(ra):
        return np.zeros(np.shape(ra), bool)
    o_ra, o_dec = np.array(others).T
    cosd = math.cos(math.radians(float(np.mean(o_dec))))

    def plane(r: np.ndarray, d: np.ndarray) -> np.ndarray:       # arcsec on the (small) field's tangent plane
        return np.column_stack([np.asarray(r) * cosd * 3600.0, np.asarray(d) * 3600.0])

    distance, _ = cKDTree(plane(o_ra, o_dec)).query(plane(ra, dec), distance_upper_bound=radius_pixels
                                                     * truth["pixel_scale_arcsec"])
    return np.isfinite(distance)


def _covered_by_all(ra: Any, dec: Any, wcss: list[Any], truth: Mapping[str, Any], margin: float = 2.0) -> Any:
    """True where (ra, dec) falls on the light-sensitive pixels of every exposure (``margin`` px in)."""
    sub = subarray_for(truth["detector"], truth["subarray"])
    lo_x, lo_y = max(0, REF_BORDER - sub.x0) + margin, max(0, REF_BORDER - sub.y0) + margin
    hi_x = min(sub.xsize, FULL_SIZE - REF_BORDER - sub.x0) - 1 - margin
    hi_y = min(sub.ysize, FULL_SIZE - REF_BORDER - sub.y0) - 1 - margin
    inside = np.ones(np.shape(ra), bool)
    for wcs in wcss:
        x, y = wcs.invert(ra, dec, with_bounding_box=False)
        inside &= (x >= lo_x) & (x <= hi_x) & (y >= lo_y) & (y <= hi_y)
    return inside


def _box_excess(sci: np.ndarray, err: np.ndarray, x: float, y: float) -> tuple[float, float]:
    """Sum of a 5x5 box at (x, y) above the median of an annulus (5-9 px), and its error."""
    ix, iy = int(round(x)), int(round(y))
    ny, nx = sci.shape
    if not (9 <= ix < nx - 9 and 9 <= iy < ny - 9):
        return math.nan, math.nan
    cut = sci[iy - 9:iy + 10, ix - 9:ix + 10]
    yy, xx = np.mgrid[-9:10, -9:10]
    r = np.hypot(xx, yy)
    ring = cut[(r >= 5) & (r <= 9)]
    ring = ring[np.isfinite(ring)]
    box = cut[7:12, 7:12]
    box_err = err[iy - 2:iy + 3, ix - 2:ix + 3]
    if ring.size < 30 or not np.all(np.isfinite(box)):
        return math.nan, math.nan
    return float(np.sum(box - np.median(ring))), float(np.sqrt(np.nansum(box_err ** 2)))


def _finish_cr_statistics(result: Image3Truth, cr_rows: list[tuple[float, float, float]]) -> None:
    rows = np.array(cr_rows, float).reshape(-1, 3)
    result.n_cr_sky_tested = len(rows)
    if len(rows):
        measured, sigma, leak = rows.T
        result.cr_residual_fraction = float(np.sum(measured) / np.sum(leak))
        result.cr_max_residual_sigma = float(np.max(measured / sigma))
        result.cr_leak_median_sigma = float(np.median(leak / sigma))


def _check_catalog(result: Image3Truth, catalog: Any, truth: Mapping[str, Any], expected: Mapping[int, float]) -> None:
    cat_ra = np.asarray(catalog["sky_centroid"].ra.deg, float)
    cat_dec = np.asarray(catalog["sky_centroid"].dec.deg, float)
    iso_flux = np.asarray(catalog["isophotal_flux"].value, float)
    iso_err = np.asarray(catalog["isophotal_flux_err"].value, float)
    tot_flux = np.asarray(catalog["aper_total_flux"].value, float)
    for s in truth["sources"]:
        if not s["in_all_exposures"]:
            continue
        sep = separation_arcsec(cat_ra, cat_dec, s["ra"], s["dec"])
        j = int(np.argmin(sep)) if len(sep) else -1
        matched = j >= 0 and sep[j] < 0.2
        if s["isolated"]:
            if not matched:
                result.n_unmatched_isolated += 1
                continue
            result.position_arcsec_isolated.append(float(sep[j]))
        if s["kind"] == "star" and matched:
            result.position_arcsec_stars.append(float(sep[j]))
            if s["isolated"]:
                result.star_flux_ratio_isophotal.append(float(iso_flux[j] / expected[s["id"]]))
                result.star_flux_ratio_total.append(float(tot_flux[j] / expected[s["id"]]))
                result.star_flux_snr.append(float(iso_flux[j] / iso_err[j]))


def _check_total_flux(result: Image3Truth, i2d: Any, segm: np.ndarray, truth: Mapping[str, Any],
                      wcss: list[Any], expected: Mapping[int, float]) -> None:
    """Sky-subtracted mosaic flux where the sources put light, inside the area every exposure
    covers / the expected flux of those sources (sources reaching outside it are cut out)."""
    from scipy.ndimage import binary_dilation  # noqa: PLC0415

    sci = np.asarray(i2d.data, float)
    ny, nx = sci.shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    covered = np.isfinite(sci) & _coverage_map(i2d.meta.wcs, sci.shape, wcss, truth)
    region = covered.copy()
    light = np.zeros(sci.shape, bool)        # where the rendered sources put light (their stamps)
    inside = []
    for s in truth["sources"]:
        sx, sy = (float(v) for v in i2d.meta.wcs.invert(s["ra"], s["dec"], with_bounding_box=False))
        reach = _stamp_radius(s, truth["pixel_scale_arcsec"]) + 3.0
        box = (slice(max(int(sy - reach), 0), max(int(sy + reach) + 2, 0)),
               slice(max(int(sx - reach), 0), max(int(sx + reach) + 2, 0)))
        near = np.hypot(xx[box] - sx, yy[box] - sy) <= reach          # the source's box only
        light[box] |= near
        if s["in_all_exposures"] and s["id"] in expected:
            inside.append(s)
        else:
            region[box] &= ~near
    sky = _fit_sky(sci, covered & ~(light | binary_dilation(segm > 0, iterations=3)), xx, yy)
    to_jy = 1e6 * float(i2d.meta.photometry.pixelarea_steradians)
    # summing only where the sources put light keeps the sky noise out of the total
    measured = float(np.sum((sci - sky)[region & light])) * to_jy
    result.total_flux_expected_jy = float(sum(expected[s["id"]] for s in inside))
    result.n_sources_in_total = len(inside)
    result.total_flux_ratio = measured / result.total_flux_expected_jy


def _coverage_map(wcs: Any, shape: tuple[int, int], wcss: list[Any], truth: Mapping[str, Any],
                  step: int = 4) -> np.ndarray:
    """bool (ny, nx): output pixels every exposure covers, computed every ``step`` pixels (the
    footprint edges are straight to well under a pixel over that distance) and 3 pixels in."""
    from scipy.ndimage import binary_erosion  # noqa: PLC0415

    ny, nx = shape
    gy, gx = np.mgrid[0:ny + step:step, 0:nx + step:step].astype(float)
    ra, dec = wcs(gx, gy, with_bounding_box=False)
    coarse = _covered_by_all(ra, dec, wcss, truth)
    fine = np.repeat(np.repeat(coarse, step, axis=0), step, axis=1)[:ny, :nx]
    return binary_erosion(fine, iterations=3)


def _stamp_radius(source: Mapping[str, Any], pixel_scale: float) -> float:
    """Radius [pixels] of the stamp :func:`.scene.render_rate` draws a source in."""
    if source["kind"] == "star":
        return 8.0 * source["fwhm_arcsec"] / pixel_scale / 2.3548
    return (5.0 if source["sersic_n"] < 2 else 7.0) * max(source["r_eff_arcsec"] / pixel_scale, 0.5)


def _fit_sky(sci: np.ndarray, use: np.ndarray, xx: np.ndarray, yy: np.ndarray, iterations: int = 5) -> np.ndarray:
    """A quadratic surface fitted to ``sci`` where ``use``, 3-sigma clipped; evaluated everywhere."""
    ny, nx = sci.shape
    u, v = xx / nx - 0.5, yy / ny - 0.5
    basis = np.stack([np.ones_like(u), u, v, u * u, u * v, v * v])
    keep = use & np.isfinite(sci)
    coef = np.zeros(basis.shape[0])
    for _ in range(iterations):
        a = basis[:, keep].T
        coef, *_ = np.linalg.lstsq(a, sci[keep], rcond=None)
        resid = sci - np.tensordot(coef, basis, axes=1)
        sigma = 1.4826 * np.median(np.abs(resid[keep]))
        keep = keep & (np.abs(resid) < 3.0 * sigma)
    return np.tensordot(coef, basis, axes=1)


__all__ = ["Image3Truth", "evaluate_image3"]
