"""tweakreg: find stars in each exposure, match them between exposures, correct each WCS.

Pure functions on arrays and gwcs objects (the calwebb_image3 driver does the file I/O):

* :func:`detect_sources` — jwst's ``make_tweakreg_catalog``: a Background2D sky (median, 3-sigma
  clipped, ``bkg_boxsize`` meshes) and a threshold of ``snr_threshold`` x the median background
  rms, then photutils' IRAFStarFinder (jwst's default), DAOStarFinder or segmentation.
* :func:`align_wcs` — stcal's ``relative_align``/``absolute_align`` on tweakwcs: each gwcs wrapped in
  a ``JWSTWCSCorrector`` (a linear correction in the V2V3 tangent plane), catalogs matched with
  ``XYXYMatch`` and fitted with tweakwcs' ``align_wcs``; optionally aligned as one group to an
  absolute reference catalog (RA/DEC columns).

Parameter names and defaults are jwst 3.0's TweakRegStep spec.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from astropy.table import Table

from .dqflags import DO_NOT_USE, PIXEL
from .errors import ParameterError

NON_SCIENCE = PIXEL["NON_SCIENCE"]
STARFINDERS = ("iraf", "dao", "segmentation")
FITGEOMETRIES = ("shift", "rshift", "rscale", "general")
_SQRT2 = math.sqrt(2.0)


@dataclass(frozen=True)
class Alignment:
    """The outcome of aligning one exposure.

    shift_arcsec: (dRA cos(Dec), dDec) of the bounding-box centre, corrected minus original WCS;
    rotation_deg: rotation of the corrected WCS relative to the original (east of north positive);
    rms_arcsec / n_matches: of the last fit (0 / 0 for the reference or a failed exposure);
    status: "SUCCESS", "REFERENCE", "FAILED: <why>" or "SKIPPED: <why>" (wcs then is the original).
    """

    wcs: Any
    shift_arcsec: tuple[float, float]
    rotation_deg: float
    rms_arcsec: float
    n_matches: int
    status: str

    @property
    def succeeded(self) -> bool:
        return self.status == "SUCCESS"


# ---------------------------------------------------------------------------------------------
# Source detection
# ---------------------------------------------------------------------------------------------

def coverage_mask(sci: np.ndarray, dq: np.ndarray) -> np.ndarray:
    """bool (ny, nx): pixels excluded from detection (DO_NOT_USE, NON_SCIENCE, non-finite)."""
    return ((dq & np.uint32(DO_NOT_USE | NON_SCIENCE)) != 0) | ~np.isfinite(sci)


def background(sci: np.ndarray, mask: np.ndarray, box_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(background, background rms), each (ny, nx): jwst's JWSTBackground (3-sigma clipped median
    in ``box_size`` meshes, 3x3 median filter; the whole image when the meshes cannot be used)."""
    from astropy.stats import SigmaClip  # noqa: PLC0415
    from astropy.utils.exceptions import AstropyUserWarning  # noqa: PLC0415
    from photutils.background import Background2D, MedianBackground  # noqa: PLC0415

    kwargs = {"filter_size": (3, 3), "coverage_mask": mask, "sigma_clip": SigmaClip(sigma=3.0),
              "bkg_estimator": MedianBackground()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=AstropyUserWarning)
        try:
            bkg = Background2D(sci, int(box_size), **kwargs)
        except ValueError:
            bkg = Background2D(sci, sci.shape, exclude_percentile=100.0, **kwargs)
    return bkg.background, bkg.background_rms


def detect_sources(sci: np.ndarray, err: np.ndarray, dq: np.ndarray, *, snr_threshold: float = 10.0,
                   kernel_fwhm: float = 2.5, bkg_boxsize: int = 400, starfinder: str = "iraf",
                   sigma_radius: float = 1.5, minsep_fwhm: float = 0.0, sharplo: float = 0.5,
                   sharphi: float = 2.0, roundlo: float = 0.0, roundhi: float = 0.2, brightest: int | None = 200,
                   peakmax: float | None = None, npixels: int = 10, connectivity: int = 8,
                   deblend: bool = True) -> Table:
    """Sources for alignment in one image: Table with columns x, y (0-based pixels), flux.

    sci, err: float (ny, nx) in any flux unit (cal: MJy/sr); dq: uint32 (ny, nx). ``err`` is used by
    the segmentation finder only (as jwst). Sources are sorted by decreasing flux; at most
    ``brightest`` are kept (IRAF/DAO finders).
    """
    if starfinder not in STARFINDERS:
        raise ParameterError(f"starfinder must be one of {STARFINDERS}, got {starfinder!r}")
    mask = coverage_mask(sci, dq)
    if mask.all():
        return _empty_catalog()
    sky, rms = background(sci, mask, bkg_boxsize)
    data = np.where(mask, 0.0, sci - sky).astype(np.float64)
    threshold = snr_threshold * rms
    from photutils.utils import NoDetectionsWarning  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=NoDetectionsWarning)
        if starfinder == "segmentation":
            table = _segmentation_sources(data, np.where(mask, np.inf, err), threshold, mask, kernel_fwhm,
                                          npixels, connectivity, deblend)
        else:
            table = _star_finder_sources(starfinder, data, float(np.median(threshold[~mask])), mask, kernel_fwhm,
                                         sigma_radius, max(2, int(minsep_fwhm * kernel_fwhm + 0.5)),
                                         (sharplo, sharphi), (roundlo, roundhi), brightest, peakmax)
    if table is None or len(table) == 0:
        return _empty_catalog()
    out = Table({"x": np.asarray(table["x"], float), "y": np.asarray(table["y"], float),
                 "flux": np.asarray(table["flux"], float)})
    out.sort("flux", reverse=True)
    return out


def _star_finder_sources(name: str, data: np.ndarray, threshold: float, mask: np.ndarray, fwhm: float,
                         sigma_radius: float, min_separation: int, sharpness: tuple[float, float],
                         roundness: tuple[float, float], brightest: int | None, peakmax: float | None) -> Table | None:
    from photutils.detection import DAOStarFinder, IRAFStarFinder  # noqa: PLC0415

    finder_class = IRAFStarFinder if name == "iraf" else DAOStarFinder
    finder = finder_class(threshold, fwhm, sigma_radius=sigma_radius, min_separation=min_separation,
                          sharpness_range=sharpness, roundness_range=roundness, n_brightest=brightest,
                          peak_max=peakmax)
    found = finder(data, mask=mask)
    if found is None:
        return None
    names = found.colnames
    xcol = "x_centroid" if "x_centroid" in names else "xcentroid"
    ycol = "y_centroid" if "y_centroid" in names else "ycentroid"
    return Table({"x": found[xcol], "y": found[ycol], "flux": found["flux"]})


def _segmentation_sources(data: np.ndarray, err: np.ndarray, threshold: np.ndarray, mask: np.ndarray,
                          kernel_fwhm: float, npixels: int, connectivity: int, deblend: bool) -> Table | None:
    from photutils.segmentation import SourceCatalog, SourceFinder  # noqa: PLC0415

    convolved = convolve_gaussian(data, kernel_fwhm, mask) if kernel_fwhm > 0 else data
    segm = SourceFinder(n_pixels=npixels, connectivity=connectivity, deblend=deblend,
                        progress_bar=False)(convolved, threshold, mask=mask)
    if segm is None:
        return None
    cat = SourceCatalog(data, segm, error=err, mask=mask, convolved_data=convolved)
    return Table({"x": cat.centroid[:, 0], "y": cat.centroid[:, 1], "flux": cat.segment_flux})


def convolve_gaussian(data: np.ndarray, fwhm: float, mask: np.ndarray | None = None) -> np.ndarray:
    """``data`` convolved with a normalised 2-D Gaussian of FWHM ``fwhm`` pixels (masked pixels
    interpolated over, as astropy's convolve does)."""
    from astropy.convolution import Gaussian2DKernel, convolve  # noqa: PLC0415
    from astropy.stats import gaussian_fwhm_to_sigma  # noqa: PLC0415
    from astropy.utils.exceptions import AstropyUserWarning  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=AstropyUserWarning)
        return convolve(data, Gaussian2DKernel(fwhm * gaussian_fwhm_to_sigma), mask=mask)


def _empty_catalog() -> Table:
    return Table({"x": np.zeros(0), "y": np.zeros(0), "flux": np.zeros(0)})


# ---------------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------------

def wcsinfo_from_gwcs(wcs: Any) -> dict[str, float]:
    """roll_ref, v2_ref, v3_ref [deg, arcsec, arcsec] read from the V2V3 -> sky rotation of an
    imaging gwcs (``RotationSequence3D`` angles v2/3600, -v3/3600, roll, dec, -ra, order zyxyz)."""
    from astropy.modeling.models import RotationSequence3D  # noqa: PLC0415

    frames = wcs.available_frames
    step = wcs.pipeline[len(frames) - 2]
    for model in _leaves(step.transform):
        if isinstance(model, RotationSequence3D):
            angles = np.asarray(model.angles.value, float)
            return {"v2_ref": float(angles[0] * 3600.0), "v3_ref": float(-angles[1] * 3600.0),
                    "roll_ref": float(angles[2])}
    raise ParameterError("the WCS has no V2V3 -> world rotation to read roll_ref/v2_ref/v3_ref from")


def _leaves(model: Any):
    if getattr(model, "n_submodels", 1) > 1 and hasattr(model, "traverse_postorder"):
        yield from (m for m in model.traverse_postorder() if getattr(m, "n_submodels", 1) == 1)
    else:
        yield model


def align_wcs(wcss: Sequence[Any], catalogs: Sequence[Table], *, wcsinfos: Sequence[Mapping[str, float]] | None = None,
              group_ids: Sequence[Any] | None = None, names: Sequence[str] | None = None,
              searchrad: float = 2.0, separation: float = 1.0, use2dhist: bool = True, tolerance: float = 0.7,
              xoffset: float = 0.0, yoffset: float = 0.0, enforce_user_order: bool = False,
              expand_refcat: bool = False, minobj: int = 15, fitgeometry: str = "rshift", nclip: int = 3,
              sigma: float = 3.0, abs_refcat: Table | None = None, abs_searchrad: float = 6.0,
              abs_separation: float = 1.0, abs_use2dhist: bool = True, abs_tolerance: float = 0.7,
              abs_minobj: int = 15, abs_fitgeometry: str = "rshift", abs_nclip: int = 3,
              abs_sigma: float = 3.0) -> list[Alignment]:
    """Align the gwcs of several exposures to each other (and to ``abs_refcat`` when given).

    wcss: the exposures' imaging gwcs (detector -> v2v3 -> ... -> world), not modified;
    catalogs: per exposure, Table with x, y (0-based pixels) as :func:`detect_sources` returns;
    wcsinfos: per exposure {roll_ref, v2_ref, v3_ref} (default: read from each gwcs);
    group_ids: exposures sharing an id are aligned as one (default: each exposure alone);
    abs_refcat: Table with RA and DEC columns [deg] (e.g. a Gaia extract or a truth catalog).

    Relative alignment is skipped (statuses "SKIPPED: ...", original WCSs) when fewer than two
    exposures have sources, or when a correction exceeds 2 x (searchrad + tolerance) (a mismatch),
    as stcal does. Returns one :class:`Alignment` per input, in order.
    """
    _check_parameters(fitgeometry, separation, tolerance, "")
    if abs_refcat is not None:
        _check_parameters(abs_fitgeometry, abs_separation, abs_tolerance, "abs_")
        expand_refcat = True   # as jwst: no duplicate reference entries when an absolute catalog follows
    if len(wcss) != len(catalogs):
        raise ParameterError(f"{len(wcss)} WCSs but {len(catalogs)} catalogs")
    correctors = _correctors(wcss, catalogs, wcsinfos, group_ids, names)
    n_groups = len({c.meta["group_id"] for c in correctors if len(c.meta["catalog"])})
    if n_groups > 1:
        status = _relative_align(correctors, searchrad=searchrad, separation=separation, use2dhist=use2dhist,
                                 tolerance=tolerance, xoffset=xoffset, yoffset=yoffset,
                                 enforce_user_order=enforce_user_order, expand_refcat=expand_refcat,
                                 minobj=minobj, fitgeometry=fitgeometry, nclip=nclip, sigma=sigma)
    else:
        status = "SKIPPED: at least two exposures with sources are needed for relative alignment"
    if status is not None and abs_refcat is None:
        return [_unchanged(w, status) for w in wcss]
    if abs_refcat is not None:
        if status is not None:   # start the absolute fit from the original WCSs
            correctors = _correctors(wcss, catalogs, wcsinfos, group_ids, names)
        status = _absolute_align(correctors, abs_refcat, searchrad=abs_searchrad, separation=abs_separation,
                                 use2dhist=abs_use2dhist, tolerance=abs_tolerance, minobj=abs_minobj,
                                 fitgeometry=abs_fitgeometry, nclip=abs_nclip, sigma=abs_sigma)
        if status is not None:
            return [_unchanged(w, status) for w in wcss]
    return [_alignment(original, corrector) for original, corrector in zip(wcss, correctors)]


def _check_parameters(fitgeometry: str, separation: float, tolerance: float, prefix: str) -> None:
    if fitgeometry not in FITGEOMETRIES:
        raise ParameterError(f"{prefix}fitgeometry must be one of {FITGEOMETRIES}, got {fitgeometry!r}")
    if separation <= _SQRT2 * tolerance:
        raise ParameterError(f"{prefix}separation ({separation}) must exceed sqrt(2) x {prefix}tolerance "
                             f"({tolerance}) to avoid source confusion")


def _correctors(wcss, catalogs, wcsinfos, group_ids, names) -> list:
    from tweakwcs.correctors import JWSTWCSCorrector  # noqa: PLC0415

    out = []
    for k, (wcs, catalog) in enumerate(zip(wcss, catalogs)):
        info = dict(wcsinfos[k]) if wcsinfos is not None else wcsinfo_from_gwcs(wcs)
        name = names[k] if names is not None else f"exposure{k + 1}"
        cat = _inside_bounding_box(Table(catalog, copy=True), wcs.bounding_box)
        cat.meta["name"] = name
        out.append(JWSTWCSCorrector(wcs=wcs, wcsinfo={key: info[key] for key in ("roll_ref", "v2_ref", "v3_ref")},
                                    meta={"catalog": cat, "name": name,
                                          "group_id": group_ids[k] if group_ids is not None else k}))
    return out


def _inside_bounding_box(catalog: Table, bounding_box: Any) -> Table:
    if bounding_box is None or len(catalog) == 0:
        return catalog
    (xmin, xmax), (ymin, ymax) = bounding_box
    x, y = np.asarray(catalog["x"]), np.asarray(catalog["y"])
    return catalog[(x > xmin) & (x < xmax) & (y > ymin) & (y < ymax)]


def _relative_align(correctors: list, *, searchrad, separation, use2dhist, tolerance, xoffset, yoffset,
                    enforce_user_order, expand_refcat, minobj, fitgeometry, nclip, sigma) -> str | None:
    """tweakwcs relative alignment; None on success, else the "SKIPPED: ..." reason."""
    from tweakwcs.imalign import align_wcs as tweakwcs_align  # noqa: PLC0415
    from tweakwcs.matchutils import XYXYMatch  # noqa: PLC0415

    match = XYXYMatch(searchrad=searchrad, separation=separation, use2dhist=use2dhist, tolerance=tolerance,
                      xoffset=xoffset, yoffset=yoffset)
    try:
        tweakwcs_align(correctors, refcat=None, enforce_user_order=enforce_user_order, expand_refcat=expand_refcat,
                       minobj=minobj, match=match, fitgeom=fitgeometry, nclip=nclip, sigma=(sigma, "rmse"))
    except (ValueError, RuntimeError) as exc:
        return f"SKIPPED: relative alignment failed ({exc})"
    limit = 2.0 * ((searchrad if use2dhist else max(abs(xoffset), abs(yoffset))) + tolerance)
    worst = max(_largest_footprint_move(c) for c in correctors)
    if worst >= limit:
        return f"SKIPPED: a WCS correction of {worst:.2f} arcsec exceeds {limit:.2f} arcsec (likely a mismatch)"
    return None


def _absolute_align(correctors: list, refcat: Table, *, searchrad, separation, use2dhist, tolerance, minobj,
                    fitgeometry, nclip, sigma) -> str | None:
    """All exposures aligned as one group to ``refcat``; None on success, else "SKIPPED: ..."."""
    from tweakwcs.imalign import align_wcs as tweakwcs_align  # noqa: PLC0415
    from tweakwcs.matchutils import XYXYMatch  # noqa: PLC0415

    ref = _refcat_table(refcat)
    if len(ref) < minobj:
        return f"SKIPPED: {len(ref)} sources in the absolute reference catalog, fewer than abs_minobj={minobj}"
    for corrector in correctors:
        corrector.meta["group_id"] = 987654   # stcal's marker: all exposures fitted as one group
        if "REFERENCE" in corrector.meta.get("fit_info", {}).get("status", ""):
            del corrector.meta["fit_info"]
    match = XYXYMatch(searchrad=searchrad, separation=separation, use2dhist=use2dhist, tolerance=tolerance)
    try:
        tweakwcs_align(correctors, refcat=ref, enforce_user_order=True, expand_refcat=False, minobj=minobj,
                       match=match, fitgeom=fitgeometry, nclip=nclip, sigma=(sigma, "rmse"))
    except (ValueError, RuntimeError) as exc:
        return f"SKIPPED: alignment to the absolute reference catalog failed ({exc})"
    return None


def _refcat_table(refcat: Table) -> Table:
    """A copy with RA/DEC columns (case-insensitive names, or a sky_centroid SkyCoord column)."""
    out = Table(refcat, copy=True)
    for col in list(out.colnames):
        if col.upper() in ("RA", "DEC") and col != col.upper():
            out.rename_column(col, col.upper())
    if "RA" not in out.colnames and "sky_centroid" in out.colnames:
        out["RA"] = out["sky_centroid"].ra.deg
        out["DEC"] = out["sky_centroid"].dec.deg
        out.remove_column("sky_centroid")
    if "RA" not in out.colnames or "DEC" not in out.colnames:
        raise ParameterError("the absolute reference catalog needs RA and DEC (or sky_centroid) columns")
    out.meta.setdefault("name", "abs_refcat")
    return out


def _largest_footprint_move(corrector: Any) -> float:
    """Largest sky separation [arcsec] between the footprint corners of the corrected and original WCS."""
    new = corrector.wcs.footprint(axis_type="spatial")
    old = corrector.original_wcs.footprint(axis_type="spatial")
    return float(np.max(separation_arcsec(new[:, 0], new[:, 1], old[:, 0], old[:, 1])))


def separation_arcsec(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Angular separation [arcsec] (haversine; inputs in degrees)."""
    r1, d1, r2, d2 = (np.radians(np.asarray(v, float)) for v in (ra1, dec1, ra2, dec2))
    h = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))) * 3600.0


def _unchanged(wcs: Any, status: str) -> Alignment:
    return Alignment(wcs=wcs, shift_arcsec=(0.0, 0.0), rotation_deg=0.0, rms_arcsec=0.0, n_matches=0, status=status)


def _alignment(original: Any, corrector: Any) -> Alignment:
    info = corrector.meta.get("fit_info", {})
    status = str(info.get("status", "FAILED: not aligned"))
    if status != "SUCCESS":
        wcs = original if status != "REFERENCE" else corrector.wcs
        return Alignment(wcs=wcs, shift_arcsec=(0.0, 0.0), rotation_deg=0.0, rms_arcsec=0.0, n_matches=0,
                         status=status)
    shift, rotation = wcs_change(original, corrector.wcs)
    return Alignment(wcs=corrector.wcs, shift_arcsec=shift, rotation_deg=rotation,
                     rms_arcsec=float(np.max(np.atleast_1d(info.get("rmse", 0.0)))),
                     n_matches=int(info.get("nmatches", 0)), status=status)


def wcs_change(before: Any, after: Any) -> tuple[tuple[float, float], float]:
    """((dRA cos(Dec), dDec) [arcsec] of the bounding-box centre, rotation [deg, east of north])
    taking ``before`` to ``after``."""
    (x0, x1), (y0, y1) = before.bounding_box
    xc, yc = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
    xs, ys = np.array([xc, xc]), np.array([yc, y1])
    ra_b, dec_b = before(xs, ys, with_bounding_box=False)
    ra_a, dec_a = after(xs, ys, with_bounding_box=False)
    cosd = math.cos(math.radians(dec_b[0]))
    shift = (float(((ra_a[0] - ra_b[0] + 180.0) % 360.0 - 180.0) * cosd * 3600.0),
             float((dec_a[0] - dec_b[0]) * 3600.0))
    pa_b = math.atan2((ra_b[1] - ra_b[0]) * cosd, dec_b[1] - dec_b[0])
    pa_a = math.atan2((ra_a[1] - ra_a[0]) * cosd, dec_a[1] - dec_a[0])
    rotation = (math.degrees(pa_a - pa_b) + 180.0) % 360.0 - 180.0
    return shift, float(rotation)


__all__ = ["Alignment", "align_wcs", "background", "convolve_gaussian", "coverage_mask", "detect_sources",
           "separation_arcsec", "wcs_change", "wcsinfo_from_gwcs"]
