"""source_catalog: segment the mosaic, measure positions, isophotal and aperture photometry.

jwst's SourceCatalogStep on arrays: the i2d (MJy/sr) is converted to Jy per pixel (x 1e6 PIXAR_SR);
a Background2D sky (``bkg_boxsize`` meshes) is subtracted and sources are pixels above
``snr_threshold`` x the background rms in the image convolved with a Gaussian of ``kernel_fwhm``
(photutils SourceFinder: ``npixels`` connected pixels, optional deblending). photutils' SourceCatalog
gives centroids, isophotal fluxes and shapes; circular apertures enclosing ``aperture_ee`` percent of
a point source's light, with the local background of an annulus subtracted, give aperture fluxes,
``aper_total`` (the largest aperture x its aperture correction), concentration indices and
``is_extended``. Fluxes in Jy, magnitudes AB.

Aperture radii and corrections come from an apcorr reference in jwst. The synthetic CRDS cache has
none, so by default they are measured on the image: the mean curve of growth of bright, compact,
isolated sources out to ``growth_radius_fwhm`` x FWHM (a Gaussian PSF of the measured FWHM when
fewer than three such sources exist); pass :class:`ApertureParams` to use reference values.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from astropy.table import QTable, Table

from .errors import ParameterError
from .fitsio import atomic_output
from .tweakreg import background, convolve_gaussian

AB_ZEROPOINT_JY = 3631.0


@dataclass(frozen=True)
class ApertureParams:
    """Circular apertures [pixels] enclosing ``ee`` percent of a point source, their corrections to
    total flux, and the local-background annulus (as jwst's apcorr reference provides)."""

    ee: tuple[int, ...]
    radii: tuple[float, ...]
    corrections: tuple[float, ...]
    bkg_inner: float
    bkg_outer: float
    origin: str = "reference"


def gaussian_aperture_params(fwhm: float, ee: Sequence[int] = (30, 50, 70), bkg_inner_fwhm: float = 4.0,
                             bkg_outer_fwhm: float = 6.0) -> ApertureParams:
    """Apertures of a circular Gaussian PSF of ``fwhm`` pixels: r = sigma sqrt(-2 ln(1 - ee))."""
    sigma = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    radii = tuple(sigma * math.sqrt(-2.0 * math.log(1.0 - e / 100.0)) for e in ee)
    return ApertureParams(tuple(int(e) for e in ee), radii, tuple(100.0 / e for e in ee),
                          bkg_inner_fwhm * fwhm, bkg_outer_fwhm * fwhm, origin=f"gaussian fwhm={fwhm:.3f}")


def growth_curve_aperture_params(data: np.ndarray, xy: np.ndarray, fwhm: float, ee: Sequence[int] = (30, 50, 70),
                                 growth_radius_fwhm: float = 4.0, bkg_inner_fwhm: float = 4.0,
                                 bkg_outer_fwhm: float = 6.0) -> ApertureParams:
    """Apertures from the median normalised curve of growth of the point sources at ``xy`` ((n, 2)
    pixels) on ``data`` (NaN = masked), each source's local background (annulus ``bkg_inner_fwhm``
    to ``bkg_outer_fwhm`` x FWHM, as the aperture fluxes) subtracted; the flux within
    ``growth_radius_fwhm`` x FWHM counts as total (the corrections miss any light beyond it)."""
    from photutils.aperture import CircularAperture, aperture_photometry  # noqa: PLC0415

    r_max = growth_radius_fwhm * fwhm
    radii = np.linspace(0.2, r_max, 60)
    apertures = [CircularAperture(xy, r) for r in radii]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        phot = aperture_photometry(np.nan_to_num(data), apertures, mask=~np.isfinite(data))
    sky, _ = local_background(data, xy, bkg_inner_fwhm * fwhm, bkg_outer_fwhm * fwhm)
    curves = np.array([np.asarray(phot[f"aperture_sum_{i}"], float) - sky * a.area
                       for i, a in enumerate(apertures)]).T
    curves = curves / curves[:, -1:]
    mean = np.median(curves, axis=0)
    mean = np.maximum.accumulate(mean)            # monotone for interpolation
    out = tuple(float(np.interp(e / 100.0, mean, radii)) for e in ee)
    return ApertureParams(tuple(int(e) for e in ee), out, tuple(100.0 / e for e in ee), bkg_inner_fwhm * fwhm,
                          bkg_outer_fwhm * fwhm, origin=f"curve of growth of {len(xy)} sources, fwhm={fwhm:.3f}")


def measure_sources(sci: np.ndarray, err: np.ndarray, wht: np.ndarray, wcs: Any, *, pixar_sr: float,
                    snr_threshold: float = 3.0, npixels: int = 25, kernel_fwhm: float = 2.0, bkg_boxsize: int = 1000,
                    deblend: bool = True, connectivity: int = 8, nlevels: int = 32, contrast: float = 0.001,
                    aperture_ee: Sequence[int] = (30, 50, 70), aperture_params: ApertureParams | None = None,
                    ci1_star_threshold: float = 2.0, ci2_star_threshold: float = 1.8) -> tuple[Table, np.ndarray]:
    """The source catalog of a mosaic and its segmentation map.

    sci, err: float (ny, nx) MJy/sr; wht: (ny, nx) drizzle weights (0 = no coverage); wcs: gwcs of
    the mosaic (pixel -> RA, Dec); pixar_sr: output pixel solid angle [sr]. Defaults are jwst 3.0's
    SourceCatalogStep spec. Returns (QTable sorted by label, int32 (ny, nx) segmentation labels; 0 =
    background). An image without sources gives an empty table and an all-zero map.
    """
    if not pixar_sr or pixar_sr <= 0:
        raise ParameterError(f"pixar_sr must be a positive pixel solid angle in sr, got {pixar_sr}")
    if len(aperture_ee) != 3 or not all(0 < e < 100 for e in aperture_ee) or list(aperture_ee) != sorted(aperture_ee):
        raise ParameterError(f"aperture_ee must be three increasing percentages, got {aperture_ee}")
    to_jy = 1.0e6 * pixar_sr
    data = np.asarray(sci, np.float64) * to_jy
    error = np.asarray(err, np.float64) * to_jy
    mask = ~np.isfinite(data) | ~np.isfinite(error) | (np.asarray(wht) == 0)
    empty_map = np.zeros(data.shape, np.int32)
    if mask.all():
        return _empty_table(aperture_ee), empty_map
    sky, rms = background(data, mask, bkg_boxsize)
    clean = np.where(mask, 0.0, data - sky)
    segm, cat = _segment(clean, np.where(mask, np.inf, error), snr_threshold * rms, mask, kernel_fwhm, npixels,
                         connectivity, deblend, nlevels, contrast)
    if segm is None:
        return _empty_table(aperture_ee), empty_map
    xy = np.column_stack([np.asarray(cat.centroid[:, 0], float), np.asarray(cat.centroid[:, 1], float)])
    finite = np.all(np.isfinite(xy), axis=1)
    fwhm = _point_source_fwhm(cat, finite)
    if aperture_params is None:
        aperture_params = _image_aperture_params(np.where(mask, np.nan, clean), xy, finite, cat, fwhm, aperture_ee)
    table = _segment_columns(cat, xy, wcs)
    _aperture_columns(table, np.where(mask, np.nan, data), np.where(mask, np.nan, error), xy, finite,
                      aperture_params)
    _extended_columns(table, aperture_params.ee, ci1_star_threshold, ci2_star_threshold)
    table.meta.update({"aperture_params": {"ee": list(aperture_params.ee), "radii_pix": list(aperture_params.radii),
                                           "corrections": list(aperture_params.corrections),
                                           "bkg_annulus_pix": [aperture_params.bkg_inner, aperture_params.bkg_outer],
                                           "origin": aperture_params.origin},
                       "psf_fwhm_pix": fwhm, "snr_threshold": snr_threshold, "npixels": npixels,
                       "kernel_fwhm": kernel_fwhm, "deblend": deblend})
    return table, np.asarray(segm.data, np.int32)


def _segment(clean, error, threshold, mask, kernel_fwhm, npixels, connectivity, deblend, nlevels, contrast):
    from photutils.segmentation import SourceCatalog, SourceFinder  # noqa: PLC0415
    from photutils.utils import NoDetectionsWarning  # noqa: PLC0415

    convolved = convolve_gaussian(clean, kernel_fwhm, mask) if kernel_fwhm > 0 else clean
    finder = SourceFinder(n_pixels=npixels, connectivity=connectivity, deblend=deblend, n_levels=nlevels,
                          contrast=contrast, progress_bar=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=NoDetectionsWarning)
        segm = finder(convolved, threshold, mask=mask)
    if segm is None:
        return None, None
    segm.relabel_consecutive()
    return segm, SourceCatalog(clean, segm, error=error, mask=mask, convolved_data=convolved)


def _point_source_fwhm(cat: Any, finite: np.ndarray) -> float:
    """PSF FWHM [pixels] as twice the median half-light radius of the most compact half of the
    high-SNR sources (exact for a Gaussian; moment-based widths are biased by noise)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fwhm = 2.0 * np.asarray(getattr(cat.flux_radius(0.5), "value", cat.flux_radius(0.5)), float)
    snr = np.asarray(cat.segment_flux, float) / np.asarray(cat.segment_flux_err, float)
    ok = finite & np.isfinite(fwhm) & (fwhm > 0) & (snr > 20)
    if not ok.any():
        ok = finite & np.isfinite(fwhm) & (fwhm > 0)
    if not ok.any():
        return 2.0
    values = np.sort(fwhm[ok])
    return float(np.median(values[: max(1, (len(values) + 1) // 2)]))


def _image_aperture_params(data: np.ndarray, xy: np.ndarray, finite: np.ndarray, cat: Any, fwhm: float,
                           ee: Sequence[int]) -> ApertureParams:
    """Curve-of-growth apertures from bright compact isolated sources, else a Gaussian's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fwhm_all = 2.0 * np.asarray(getattr(cat.flux_radius(0.5), "value", cat.flux_radius(0.5)), float)
    snr = np.asarray(cat.segment_flux, float) / np.asarray(cat.segment_flux_err, float)
    nn = _nearest_neighbour_distance(xy, finite)
    ny, nx = data.shape
    edge = 6.0 * fwhm
    inside = finite & (xy[:, 0] > edge) & (xy[:, 0] < nx - 1 - edge) & (xy[:, 1] > edge) & (xy[:, 1] < ny - 1 - edge)
    stars = inside & (snr > 50) & (np.abs(fwhm_all - fwhm) < 0.15 * fwhm) & (nn > 10.0 * fwhm)
    if stars.sum() >= 3:
        return growth_curve_aperture_params(data, xy[stars], fwhm, ee)
    return gaussian_aperture_params(fwhm, ee)


def _nearest_neighbour_distance(xy: np.ndarray, finite: np.ndarray) -> np.ndarray:
    from scipy.spatial import cKDTree  # noqa: PLC0415

    out = np.full(len(xy), np.inf)
    idx = np.flatnonzero(finite)
    if len(idx) > 1:
        dist, _ = cKDTree(xy[idx]).query(xy[idx], k=2)
        out[idx] = dist[:, 1]
    return out


def _segment_columns(cat: Any, xy: np.ndarray, wcs: Any) -> QTable:
    import astropy.units as u  # noqa: PLC0415
    from astropy.coordinates import SkyCoord  # noqa: PLC0415

    ra, dec = wcs(xy[:, 0], xy[:, 1], with_bounding_box=False)
    flux = np.asarray(cat.segment_flux, float)
    flux_err = np.asarray(cat.segment_flux_err, float)
    abmag, abmag_err = flux_to_abmag(flux, flux_err)
    orientation = np.asarray(cat.orientation.value, float)
    table = QTable()
    table["label"] = np.asarray(cat.label, np.int32)
    table["xcentroid"] = xy[:, 0]
    table["ycentroid"] = xy[:, 1]
    table["sky_centroid"] = SkyCoord(ra=ra * u.deg, dec=dec * u.deg, frame="icrs")
    table["isophotal_flux"] = flux * u.Jy
    table["isophotal_flux_err"] = flux_err * u.Jy
    table["isophotal_abmag"] = abmag
    table["isophotal_abmag_err"] = abmag_err
    table["isophotal_area"] = np.asarray(cat.area.value, float) * u.pix ** 2
    table["semimajor_sigma"] = np.asarray(cat.semimajor_axis.value, float) * u.pix
    table["semiminor_sigma"] = np.asarray(cat.semiminor_axis.value, float) * u.pix
    table["ellipticity"] = np.asarray(cat.ellipticity.value if hasattr(cat.ellipticity, "value") else cat.ellipticity,
                                      float)
    table["orientation"] = orientation * u.deg
    table["sky_orientation"] = _sky_orientation(wcs, xy, orientation) * u.deg
    return table


def _sky_orientation(wcs: Any, xy: np.ndarray, orientation_deg: np.ndarray) -> np.ndarray:
    """Position angle east of north [deg, 0-180) of each source's major axis (through the WCS)."""
    theta = np.radians(orientation_deg)
    x1, y1 = xy[:, 0] + np.cos(theta), xy[:, 1] + np.sin(theta)
    ra0, dec0 = wcs(xy[:, 0], xy[:, 1], with_bounding_box=False)
    ra1, dec1 = wcs(x1, y1, with_bounding_box=False)
    east = ((ra1 - ra0 + 180.0) % 360.0 - 180.0) * np.cos(np.radians(dec0))
    return np.degrees(np.arctan2(east, dec1 - dec0)) % 180.0


def _aperture_columns(table: QTable, data: np.ndarray, error: np.ndarray, xy: np.ndarray, finite: np.ndarray,
                      params: ApertureParams) -> None:
    """aper_bkg_flux(_err) [Jy/pixel], aper<ee>_flux(_err) [Jy], aper<ee>_abmag(_err), aper_total_*."""
    import astropy.units as u  # noqa: PLC0415
    from photutils.aperture import CircularAperture, aperture_photometry  # noqa: PLC0415

    n = len(xy)
    bkg, bkg_err = np.full(n, np.nan), np.full(n, np.nan)
    fluxes = [(np.full(n, np.nan), np.full(n, np.nan)) for _ in params.radii]
    if finite.any():
        pos = xy[finite]
        bkg[finite], bkg_err[finite] = local_background(data, pos, params.bkg_inner, params.bkg_outer)
        apertures = [CircularAperture(pos, r) for r in params.radii]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            phot = aperture_photometry(np.nan_to_num(data), apertures, error=np.nan_to_num(error),
                                       mask=~np.isfinite(data))
        for i, aperture in enumerate(apertures):
            fluxes[i][0][finite] = np.asarray(phot[f"aperture_sum_{i}"], float) - bkg[finite] * aperture.area
            fluxes[i][1][finite] = np.asarray(phot[f"aperture_sum_err_{i}"], float)
    table["aper_bkg_flux"] = bkg * u.Jy
    table["aper_bkg_flux_err"] = bkg_err * u.Jy
    for ee, (flux, flux_err) in zip(params.ee, fluxes):
        _flux_columns(table, f"aper{ee}", flux, flux_err)
    correction = params.corrections[-1]
    _flux_columns(table, "aper_total", fluxes[-1][0] * correction, fluxes[-1][1] * correction)


def _flux_columns(table: QTable, name: str, flux: np.ndarray, flux_err: np.ndarray) -> None:
    import astropy.units as u  # noqa: PLC0415

    abmag, abmag_err = flux_to_abmag(flux, flux_err)
    table[f"{name}_flux"] = flux * u.Jy
    table[f"{name}_flux_err"] = flux_err * u.Jy
    table[f"{name}_abmag"] = abmag
    table[f"{name}_abmag_err"] = abmag_err


def local_background(data: np.ndarray, xy: np.ndarray, r_in: float, r_out: float) -> tuple[np.ndarray, np.ndarray]:
    """Per source, the 3-sigma-clipped median of ``data`` in an annulus and its standard error
    sqrt(pi / 2N) x std (jwst's local background); NaN pixels ignored."""
    from astropy.stats import SigmaClip  # noqa: PLC0415
    from photutils.aperture import CircularAnnulus  # noqa: PLC0415

    clip = SigmaClip(sigma=3.0)
    med, err = np.full(len(xy), np.nan), np.full(len(xy), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, m in enumerate(CircularAnnulus(xy, r_in, r_out).to_mask(method="center")):
            values = m.get_values(data)
            values = clip(values[np.isfinite(values)], masked=False)
            if values.size:
                med[k] = np.median(values)
                err[k] = math.sqrt(math.pi / (2.0 * values.size)) * np.std(values)
    return med, err


def _extended_columns(table: QTable, ee: Sequence[int], ci1: float, ci2: float) -> None:
    """CI_<b>_<a> = aper<b>_flux / aper<a>_flux for the pairs (2,1), (3,2), (3,1); is_extended when
    the first two exceed their star thresholds (jwst's rule)."""
    f = [np.asarray(table[f"aper{e}_flux"].value, float) for e in ee]
    with np.errstate(divide="ignore", invalid="ignore"):
        pairs = [(1, 0), (2, 1), (2, 0)]
        cis = [f[b] / f[a] for b, a in pairs]
    for (b, a), ci in zip(pairs, cis):
        table[f"CI_{ee[b]}_{ee[a]}"] = ci
    table["is_extended"] = (cis[0] > ci1) & (cis[1] > ci2)


def flux_to_abmag(flux: np.ndarray, flux_err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AB magnitude and error of fluxes in Jy (NaN for non-positive flux), as jwst."""
    flux = np.asarray(flux, float)
    flux_err = np.asarray(flux_err, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        abmag = -2.5 * np.log10(flux / AB_ZEROPOINT_JY)
        abmag_err = 2.5 * np.log10(1.0 + flux_err / flux)
    bad = ~(flux > 0)
    abmag[bad] = np.nan
    abmag_err[bad] = np.nan
    return abmag, abmag_err


def _empty_table(ee: Sequence[int]) -> QTable:
    names = ["label", "xcentroid", "ycentroid", "isophotal_flux", "isophotal_flux_err", "isophotal_abmag",
             "isophotal_abmag_err"]
    for e in ee:
        names += [f"aper{e}_flux", f"aper{e}_flux_err", f"aper{e}_abmag", f"aper{e}_abmag_err"]
    names += ["aper_total_flux", "aper_total_flux_err", "aper_total_abmag", "aper_total_abmag_err", "is_extended"]
    return QTable({n: np.zeros(0, np.int32 if n == "label" else bool if n == "is_extended" else float)
                   for n in names})


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def write_catalog(table: Table, path: str | Path) -> Path:
    """Write the catalog as ECSV (``*_cat.ecsv``) through a temporary name and a rename."""
    path = Path(path)
    with atomic_output(path) as tmp:
        table.write(tmp, format="ascii.ecsv", overwrite=True)
    return path


def write_segmentation(segm: np.ndarray, wcs_or_header: Any, path: str | Path, *, meta_from: Any = None) -> Path:
    """Write the segmentation map (``*_segm.fits``) atomically.

    With a gwcs: a stdatamodels SegmentationMapModel (gwcs in the ASDF extension; ``meta_from``, an
    open model such as the i2d, gives its PRIMARY metadata as jwst does). With a FITS header: a
    PRIMARY + SCI (int32) file with the header's WCS cards in SCI.
    """
    from astropy.io import fits  # noqa: PLC0415

    path = Path(path)
    segm = np.asarray(segm, np.int32)
    if isinstance(wcs_or_header, fits.Header):
        sci = fits.ImageHDU(segm, header=wcs_or_header.copy(), name="SCI")
        with atomic_output(path) as tmp:
            fits.HDUList([fits.PrimaryHDU(), sci]).writeto(tmp, overwrite=True)
        return path
    from stdatamodels.jwst.datamodels import SegmentationMapModel  # noqa: PLC0415

    from .calimage import save_model  # noqa: PLC0415

    with SegmentationMapModel(data=segm.astype(np.uint32)) as model:
        if meta_from is not None:
            model.update(meta_from, only="PRIMARY")
        model.meta.wcs = wcs_or_header
        model.meta.filename = path.name
        return save_model(model, path)


__all__ = ["ApertureParams", "flux_to_abmag", "gaussian_aperture_params", "growth_curve_aperture_params",
           "local_background", "measure_sources", "write_catalog", "write_segmentation"]
