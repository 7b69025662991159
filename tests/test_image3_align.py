"""tweakreg and source_catalog functions on small synthetic images with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.table import Table

from calstream.steps.catalog import (ApertureParams, flux_to_abmag, gaussian_aperture_params, measure_sources,
                                     write_catalog, write_segmentation)
from calstream.steps.dqflags import DO_NOT_USE
from calstream.steps.errors import ParameterError
from calstream.steps.image2 import Pointing, imaging_wcs
from calstream.steps.synth.detector import detector_info, subarray_for
from calstream.steps.synth.scene import subarray_v2v3
from calstream.steps.synth.stage2 import distortion_model, pixel_area_sr
from calstream.steps.tweakreg import align_wcs, detect_sources, wcs_change, wcsinfo_from_gwcs

SIGMA = 1.0   # PSF sigma [pixels] of the test images


def _stars(rng: np.random.Generator, n: int, size: int, margin: float = 12.0) -> np.ndarray:
    """(n, 3) x, y, flux with stars at least 8 px apart."""
    out: list[tuple[float, float, float]] = []
    while len(out) < n:
        x, y = rng.uniform(margin, size - margin, 2)
        if all(math.hypot(x - a, y - b) > 8.0 for a, b, _ in out):
            out.append((x, y, float(rng.uniform(200.0, 2000.0))))
    return np.array(out)


def _render(stars: np.ndarray, shape: tuple[int, int], sky: float = 1.0) -> np.ndarray:
    """Pixel-integrated Gaussians (sigma SIGMA) on a flat sky."""
    from scipy.special import erf

    ny, nx = shape
    img = np.full(shape, sky, np.float64)
    ex, ey = np.arange(nx + 1) - 0.5, np.arange(ny + 1) - 0.5
    for x, y, f in stars:
        gx = np.diff(0.5 * erf((ex - x) / (SIGMA * math.sqrt(2))))
        gy = np.diff(0.5 * erf((ey - y) / (SIGMA * math.sqrt(2))))
        img += f * np.outer(gy, gx)
    return img


@pytest.fixture(scope="module")
def star_image():
    rng = np.random.default_rng(7)
    stars = _stars(rng, 25, 200)
    sci = _render(stars, (200, 200)) + rng.normal(0.0, 0.05, (200, 200))
    err = np.full(sci.shape, 0.05)
    dq = np.zeros(sci.shape, np.uint32)
    return stars, sci.astype(np.float32), err.astype(np.float32), dq


def test_detect_sources_finds_the_stars_at_their_positions(star_image):
    stars, sci, err, dq = star_image
    cat = detect_sources(sci, err, dq, snr_threshold=10.0, kernel_fwhm=2.5, bkg_boxsize=50)
    assert cat.colnames == ["x", "y", "flux"]
    assert np.all(np.diff(cat["flux"]) <= 0)
    d = np.hypot(cat["x"][:, None] - stars[:, 0][None, :], cat["y"][:, None] - stars[:, 1][None, :])
    assert len(cat) == len(stars)
    # IRAF starfind centroids are pulled towards pixel centres by up to ~0.15 px (jwst's default
    # finder); the pull averages out over many stars
    nearest = d.argmin(axis=1)
    assert np.all(d.min(axis=1) < 0.15)
    assert abs(np.mean(cat["x"] - stars[nearest, 0])) < 0.03 and abs(np.mean(cat["y"] - stars[nearest, 1])) < 0.03


def test_detect_sources_ignores_masked_pixels_and_segmentation_agrees(star_image):
    stars, sci, err, dq = star_image
    dq = dq.copy()
    x, y = int(round(stars[0, 0])), int(round(stars[0, 1]))
    dq[y - 6:y + 7, x - 6:x + 7] = DO_NOT_USE
    cat = detect_sources(sci, err, dq, bkg_boxsize=50)
    assert len(cat) == len(stars) - 1
    assert np.min(np.hypot(cat["x"] - stars[0, 0], cat["y"] - stars[0, 1])) > 5
    seg = detect_sources(sci, err, np.zeros_like(dq), starfinder="segmentation", bkg_boxsize=50)
    d = np.hypot(seg["x"][:, None] - stars[:, 0][None, :], seg["y"][:, None] - stars[:, 1][None, :])
    assert len(seg) == len(stars) and np.all(d.min(axis=1) < 0.1)
    with pytest.raises(ParameterError, match="starfinder"):
        detect_sources(sci, err, dq, starfinder="nope")


def test_detect_sources_on_an_empty_or_fully_masked_image():
    rng = np.random.default_rng(0)
    sci = rng.normal(1.0, 0.01, (64, 64)).astype(np.float32)
    assert len(detect_sources(sci, sci * 0 + 0.01, np.zeros(sci.shape, np.uint32), bkg_boxsize=32)) == 0
    assert len(detect_sources(sci, sci, np.full(sci.shape, DO_NOT_USE, np.uint32))) == 0


# ---------------------------------------------------------------------------------------------
# align_wcs on distortion-aware imaging gwcs
# ---------------------------------------------------------------------------------------------

RA0, DEC0, ROLL0 = 53.16, -27.78, 45.0
SUB = subarray_for("NRCA1", "SUB640")
INFO = detector_info("NRCA1")
V2, V3 = subarray_v2v3(INFO, SUB)
DISTORTION = distortion_model("NRCA1")


def _wcs(dra_arcsec: float = 0.0, ddec_arcsec: float = 0.0, droll_arcsec: float = 0.0):
    dec = DEC0 + ddec_arcsec / 3600.0
    ra = RA0 + dra_arcsec / 3600.0 / math.cos(math.radians(dec))
    return imaging_wcs(Pointing(ra, dec, ROLL0 + droll_arcsec / 3600.0, V2, V3, 1.0), DISTORTION,
                       SUB.xstart, SUB.ystart, SUB.xsize, SUB.ysize)


@pytest.fixture(scope="module")
def sky_stars():
    """RA/Dec of 60 stars spread over the SUB640 field."""
    rng = np.random.default_rng(3)
    x, y = rng.uniform(30, 610, 60), rng.uniform(30, 610, 60)
    return _wcs()(x, y)


def _catalog(true_wcs, ra, dec, rng, noise_pix=0.02) -> Table:
    x, y = true_wcs.invert(ra, dec, with_bounding_box=False)
    return Table({"x": x + rng.normal(0, noise_pix, x.size), "y": y + rng.normal(0, noise_pix, y.size),
                  "flux": np.ones(x.size)})


def _max_offset_arcsec(wcs_a, wcs_b) -> float:
    yy, xx = np.mgrid[0:640:64, 0:640:64].astype(float)
    ra_a, dec_a = wcs_a(xx, yy)
    ra_b, dec_b = wcs_b(xx, yy)
    return float(np.max(np.hypot((ra_a - ra_b) * math.cos(math.radians(DEC0)), dec_a - dec_b)) * 3600.0)


def test_wcsinfo_is_read_from_the_gwcs():
    info = wcsinfo_from_gwcs(_wcs())
    assert info == pytest.approx({"v2_ref": V2, "v3_ref": V3, "roll_ref": ROLL0}, abs=1e-9)


def test_align_wcs_removes_relative_pointing_errors(sky_stars):
    rng = np.random.default_rng(11)
    errors = [(0.0, 0.0, 0.0), (0.21, -0.12, 4.0), (-0.15, 0.3, -6.0)]
    true = [_wcs() for _ in errors]
    header = [_wcs(*e) for e in errors]
    header[0] = true[0]
    cats = [_catalog(t, *sky_stars, rng, noise_pix=0.005) for t in true]
    result = align_wcs(header, cats)
    assert [a.status for a in result] == ["REFERENCE", "SUCCESS", "SUCCESS"]
    for k, (a, t) in enumerate(zip(result, true)):
        assert _max_offset_arcsec(a.wcs, t) < 0.003, k
    # the correction undoes the error: shift = -(error) in (dRA cos(Dec), dDec)
    assert result[1].shift_arcsec == pytest.approx((-0.21, 0.12), abs=0.003)
    assert result[1].n_matches >= 40 and 0 < result[1].rms_arcsec < 0.003
    assert result[2].rotation_deg * 3600 == pytest.approx(6.0, abs=2.0)   # noise ~0.8 arcsec
    assert _max_offset_arcsec(header[1], true[1]) > 0.2   # inputs untouched


def test_align_wcs_to_an_absolute_catalog(sky_stars):
    rng = np.random.default_rng(12)
    errors = [(0.25, 0.1, 0.0), (0.1, -0.2, 3.0)]
    true = [_wcs(), _wcs()]
    header = [_wcs(*e) for e in errors]
    cats = [_catalog(t, *sky_stars, rng) for t in true]
    relative = align_wcs(header, cats)
    assert _max_offset_arcsec(relative[1].wcs, true[1]) > 0.2    # aligned to exposure 1's wrong frame
    refcat = Table({"ra": sky_stars[0], "dec": sky_stars[1]})
    result = align_wcs(header, cats, abs_refcat=refcat)
    assert all(a.status == "SUCCESS" for a in result)
    for a, t in zip(result, true):
        assert _max_offset_arcsec(a.wcs, t) < 0.005


def test_align_wcs_skips_when_it_cannot_align(sky_stars):
    rng = np.random.default_rng(13)
    one = align_wcs([_wcs(0.2)], [_catalog(_wcs(), *sky_stars, rng)])
    assert one[0].status.startswith("SKIPPED") and one[0].shift_arcsec == (0.0, 0.0)
    few = [_catalog(_wcs(), sky_stars[0][:5], sky_stars[1][:5], rng) for _ in range(2)]
    result = align_wcs([_wcs(), _wcs(0.3)], few)
    assert result[1].status.startswith("FAILED") and result[1].wcs is not None
    assert _max_offset_arcsec(result[1].wcs, _wcs(0.3)) == 0.0
    with pytest.raises(ParameterError, match="separation"):
        align_wcs([_wcs(), _wcs()], few, separation=0.5, tolerance=0.7)
    with pytest.raises(ParameterError, match="fitgeometry"):
        align_wcs([_wcs(), _wcs()], few, fitgeometry="affine")


def test_wcs_change_measures_shift_and_rotation():
    shift, rotation = wcs_change(_wcs(), _wcs(0.1, -0.2, 36.0))
    assert shift == pytest.approx((0.1, -0.2), abs=2e-3)
    assert rotation * 3600.0 == pytest.approx(36.0, abs=0.5)


# ---------------------------------------------------------------------------------------------
# source catalog
# ---------------------------------------------------------------------------------------------

def test_gaussian_apertures():
    p = gaussian_aperture_params(2.0, (30, 50, 70))
    assert p.radii[1] == pytest.approx(1.0)            # r50 = FWHM / 2 for a Gaussian
    assert p.corrections == pytest.approx((100 / 30, 2.0, 100 / 70))
    abmag, err = flux_to_abmag(np.array([3631.0, 3631e-6, -1.0]), np.array([0.0, 3631e-7, 1.0]))
    assert abmag[:2] == pytest.approx([0.0, 15.0]) and np.isnan(abmag[2])
    assert err[1] == pytest.approx(2.5 * math.log10(1.1))


@pytest.fixture(scope="module")
def mosaic():
    """A 300x300 'i2d' in MJy/sr: sky 0.2 + 30 stars, the SUB640-like gwcs (first 300x300 pixels)."""
    rng = np.random.default_rng(5)
    stars = _stars(rng, 30, 300, margin=20.0)
    sci = _render(stars, (300, 300), sky=0.2) + rng.normal(0.0, 0.02, (300, 300))
    err = np.full(sci.shape, 0.02, np.float32)
    wht = np.ones(sci.shape, np.float32)
    wht[:, :8] = 0.0
    sci[:, :8] = np.nan
    return stars, sci.astype(np.float32), err, wht, _wcs(), pixel_area_sr("NRCA1")


def test_measure_sources_positions_fluxes_and_magnitudes(mosaic):
    stars, sci, err, wht, wcs, pixar = mosaic
    table, segm = measure_sources(sci, err, wht, wcs, pixar_sr=pixar)
    assert len(table) == len(stars) and segm.shape == sci.shape and segm.max() == len(stars)
    d = np.hypot(np.asarray(table["xcentroid"])[:, None] - stars[:, 0], np.asarray(table["ycentroid"])[:, None] - stars[:, 1])
    match = d.argmin(axis=1)
    assert np.all(d.min(axis=1) < 0.03)
    ra, dec = wcs(stars[match, 0], stars[match, 1])
    assert np.allclose(table["sky_centroid"].ra.deg, ra, atol=1e-8)
    truth_jy = stars[match, 2] * 1e6 * pixar
    for column in ("isophotal_flux", "aper_total_flux"):
        ratio = table[column].value / truth_jy
        assert np.median(ratio) == pytest.approx(1.0, abs=0.01), column
    assert np.all(np.abs(table["aper_total_flux"].value / truth_jy - 1) < 0.05)
    assert table["aper50_flux"].value == pytest.approx(0.5 * truth_jy, rel=0.05)
    assert np.allclose(table["aper_total_abmag"], -2.5 * np.log10(table["aper_total_flux"].value / 3631.0))
    assert table["aper_bkg_flux"].value == pytest.approx(0.2 * 1e6 * pixar, rel=0.03)
    assert not table["is_extended"].any()
    assert table.meta["aperture_params"]["origin"].startswith("curve of growth")
    assert table.meta["psf_fwhm_pix"] == pytest.approx(2.3548 * math.sqrt(SIGMA ** 2 + 1 / 12), rel=0.06)
    for label in np.asarray(table["label"]):     # segment labels sit under their centroids
        row = table[np.asarray(table["label"]) == label][0]
        assert segm[int(round(row["ycentroid"])), int(round(row["xcentroid"]))] == label


def test_measure_sources_with_reference_apertures_and_errors(mosaic):
    stars, sci, err, wht, wcs, pixar = mosaic
    params = ApertureParams((30, 50, 70), (0.845, 1.177, 1.552), (1 / 0.3, 2.0, 1 / 0.7), 9.0, 14.0)
    table, _ = measure_sources(sci, err, wht, wcs, pixar_sr=pixar, aperture_params=params)
    assert table.meta["aperture_params"]["origin"] == "reference"
    with pytest.raises(ParameterError, match="pixar_sr"):
        measure_sources(sci, err, wht, wcs, pixar_sr=0.0)
    with pytest.raises(ParameterError, match="aperture_ee"):
        measure_sources(sci, err, wht, wcs, pixar_sr=pixar, aperture_ee=(70, 50, 30))
    empty, segm = measure_sources(np.full((50, 50), 0.2, np.float32), np.full((50, 50), 0.02, np.float32),
                                  np.ones((50, 50)), wcs, pixar_sr=pixar)
    assert len(empty) == 0 and not segm.any()


def test_catalog_and_segmentation_files(mosaic, tmp_path):
    from astropy.io import fits
    from astropy.table import QTable
    from stdatamodels.jwst import datamodels

    stars, sci, err, wht, wcs, pixar = mosaic
    table, segm = measure_sources(sci, err, wht, wcs, pixar_sr=pixar)
    cat_path = write_catalog(table, tmp_path / "m_cat.ecsv")
    back = QTable.read(cat_path)
    assert np.allclose(back["sky_centroid"].dec.deg, table["sky_centroid"].dec.deg)
    assert back["aper_total_flux"].unit == "Jy"
    seg_path = write_segmentation(segm, wcs, tmp_path / "m_segm.fits")
    with datamodels.open(seg_path) as model:
        assert np.array_equal(model.data, segm) and model.meta.wcs is not None
    header = fits.Header({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN"})
    plain = write_segmentation(segm, header, tmp_path / "p_segm.fits")
    assert np.array_equal(fits.getdata(plain, "SCI"), segm)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_cat.ecsv", "m_segm.fits", "p_segm.fits"]
