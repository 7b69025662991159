"""resample: drizzle kernels with known answers on tiny images, the output grid, blot, and parity
with jwst's ResampleStep on calibrated synthetic exposures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calstream.steps import dqflags
from calstream.steps.resample import (ExposureTimes, MosaicAccumulator, PixmapCache, ResampleInput, WcsReference,
                                      bad_bits, blot, drizzle_weight, error_from_variances, footprint,
                                      full_pixel_map, mean_pixel_area, output_grid, pixel_map,
                                      smoothed_variance, spherical_polygon_area)

SCALE = 0.031            # arcsec / pixel
CRVAL = (53.16, -27.78)
DNU, JUMP = int(dqflags.DO_NOT_USE), int(dqflags.JUMP_DET)


def tan_wcs(shape: tuple[int, int], crval=CRVAL, shift=(0.0, 0.0), rot_deg: float = 0.0, scale: float = SCALE):
    """A TAN gwcs of ``shape``; north up / east left rotated by ``rot_deg``; the reference pixel
    is the centre moved by ``shift`` pixels (so the sky moves by -shift on the detector)."""
    import gwcs.coordinate_frames as cf
    from astropy import coordinates as coord
    from astropy import units as u
    from astropy.modeling import models
    from gwcs import WCS, FITSImagingWCSTransform

    ny, nx = shape
    r = math.radians(rot_deg)
    pc = np.array([[-math.cos(r), math.sin(r)], [math.sin(r), math.cos(r)]])
    crpix = ((nx - 1) / 2 + shift[0], (ny - 1) / 2 + shift[1])
    transform = FITSImagingWCSTransform(models.Pix2Sky_TAN(), crpix=crpix, crval=crval,
                                        cdelt=[scale / 3600.0] * 2, pc=pc)
    detector = cf.Frame2D(name="detector", axes_order=(0, 1), unit=(u.pix, u.pix))
    world = cf.CelestialFrame(reference_frame=coord.ICRS(), name="world")
    wcs = WCS([(detector, transform), (world, None)])
    wcs.bounding_box = ((-0.5, nx - 0.5), (-0.5, ny - 0.5))
    return wcs


def grid_over(*wcss, shape=(20, 20), **kwargs):
    ref = WcsReference(CRVAL[0], CRVAL[1], 0.0, 0.0, -1)
    return output_grid([footprint(w) for w in wcss], wcss[0], ref, shape, **kwargs)


def image(sci, wcs, *, var=1.0, dq=None, t=100.0, group="g1", level=None):
    sci = np.asarray(sci, np.float32)
    var_arr = np.full(sci.shape, var, np.float32)
    return ResampleInput(sci, np.zeros(sci.shape, np.uint32) if dq is None else dq, wcs,
                         ExposureTimes(t, 60000.0, 60000.1, t * 1.2), group, var_arr, var_arr * 0.5,
                         var_arr * 0.25, level, False, group)


# ---------------------------------------------------------------------------------------------
# DQ and weights
# ---------------------------------------------------------------------------------------------

def test_good_bits_specifications():
    assert bad_bits("~DO_NOT_USE+NON_SCIENCE") == DNU | int(dqflags.PIXEL["NON_SCIENCE"])
    assert bad_bits(0) == 0xFFFFFFFF                      # every set bit is bad
    assert bad_bits(JUMP) == 0xFFFFFFFF & ~JUMP           # JUMP_DET ignored
    assert bad_bits(None) == 0


def test_drizzle_weight_ivm_exptime_and_dq():
    dq = np.array([[0, DNU, JUMP, 0]], np.uint32)
    var = np.array([[4.0, 4.0, 2.0, 0.0]], np.float32)
    ivm = drizzle_weight(dq, var, "ivm", "~DO_NOT_USE+NON_SCIENCE")
    assert ivm.dtype == np.float32 and ivm.tolist() == [[0.25, 0.0, 0.5, 0.0]]     # 1/0 -> 0
    assert drizzle_weight(dq, var, "exptime", "~DO_NOT_USE", exposure_time=30.0).tolist() == [[30, 0, 30, 30]]
    assert drizzle_weight(dq, None, "ivm", 0).tolist() == [[1, 0, 0, 1]]           # no VAR_RNOISE: 1


def test_ivm_smed_follows_the_exposure_not_single_pixels():
    """A noisy pixel (4x the variance) keeps its neighbours' weight; a deeper exposure (half the
    variance everywhere) weighs twice; bad DQ and non-finite VAR_RNOISE weigh 0."""
    var = np.full((9, 9), 2.0, np.float32)
    var[4, 4] = 8.0
    var[0, 0] = np.nan
    dq = np.zeros((9, 9), np.uint32)
    dq[8, 8] = DNU
    smed = drizzle_weight(dq, var, "ivm-smed", "~DO_NOT_USE")
    assert smed[4, 4] == 0.5 and smed[4, 3] == 0.5
    assert drizzle_weight(dq, var, "ivm", "~DO_NOT_USE")[4, 4] == 0.125
    assert smed[0, 0] == 0 and smed[8, 8] == 0
    np.testing.assert_array_equal(drizzle_weight(dq, var / 2, "ivm-smed", "~DO_NOT_USE"), 2 * smed)


def test_smoothed_variance_is_a_separable_running_median():
    var = np.array([[1.0, 1.0, 100.0, 1.0, 1.0, 3.0, 3.0, 3.0]], np.float32)
    assert smoothed_variance(var, half=1).tolist() == [[1.0, 1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 3.0]]
    gaps = np.array([[np.nan, 2.0, -1.0, 4.0]], np.float32)       # NaN and <= 0 ignored
    assert smoothed_variance(gaps, half=1).tolist() == [[2.0, 2.0, 3.0, 4.0]]
    assert np.isnan(smoothed_variance(np.full((2, 2), np.nan, np.float32), half=1)).all()
    column = np.array([[1.0], [50.0], [1.0]], np.float32)          # the second pass runs along columns
    assert smoothed_variance(column, half=1).ravel().tolist() == [25.5, 1.0, 25.5]


# ---------------------------------------------------------------------------------------------
# Drizzling with known answers
# ---------------------------------------------------------------------------------------------

def test_flux_of_a_point_is_conserved_and_split_by_overlap_area():
    shape = (20, 20)
    w_in = tan_wcs(shape, shift=(0.3, -0.4))
    grid = grid_over(w_in, tan_wcs(shape), shape=shape)
    sci = np.zeros(shape, np.float32)
    sci[9, 11] = 1000.0
    acc = MosaicAccumulator(grid, n_inputs=1, fillval=0.0)
    acc.add(image(sci, w_in))
    out = acc.finalize()
    np.testing.assert_allclose(np.nansum(out.sci), 1000.0, rtol=1e-5)
    # the input pixel's square lands on a 2x2 block: values = 1000 x overlap fractions
    x, y = full_pixel_map(w_in, grid.wcs, shape)[9, 11]
    ix, iy = int(math.floor(x)), int(math.floor(y))
    fx, fy = x - ix, y - iy                           # centre offset inside the lower-left pixel
    expected = 1000.0 * np.outer([1.0 - fy, fy], [1.0 - fx, fx])   # rows: iy, iy+1
    np.testing.assert_allclose(out.sci[iy:iy + 2, ix:ix + 2], expected, rtol=2e-4, atol=1e-3)


def test_constant_stays_constant_and_two_exposures_halve_the_variance():
    shape = (20, 20)
    w1, w2 = tan_wcs(shape), tan_wcs(shape, shift=(1.3, 0.7))
    grid = grid_over(w1, w2, shape=shape)
    acc = MosaicAccumulator(grid, n_inputs=2)
    acc.add(image(np.full(shape, 5.0), w1, var=2.0, group="a"))
    acc.add(image(np.full(shape, 5.0), w2, var=2.0, group="b"))
    out = acc.finalize()
    both = out.con[0] == 3
    assert both.sum() > 200
    np.testing.assert_allclose(out.sci[both], 5.0, rtol=1e-6)
    # sqrt(var) drizzled (constant), squared, weighted 1/var: var/2 where both contribute
    np.testing.assert_allclose(out.variances["var_rnoise"][both], 1.0, rtol=1e-5)
    np.testing.assert_allclose(out.variances["var_poisson"][both], 0.5, rtol=1e-5)
    np.testing.assert_allclose(out.err[both], np.sqrt(1.0 + 0.5 + 0.25), rtol=1e-5)
    only1 = out.con[0] == 1
    np.testing.assert_allclose(out.variances["var_rnoise"][only1], 2.0, rtol=1e-5)
    assert np.all(np.isnan(out.sci[out.con[0] == 0]))            # fillval NAN where nothing landed
    assert out.pointings == 2 and out.exposure_time == 200.0 and out.duration == 240.0


def test_inverse_variance_and_exptime_weighting():
    shape = (16, 16)
    w1, w2 = tan_wcs(shape), tan_wcs(shape, shift=(0.5, 0.25))
    grid = grid_over(w1, w2, shape=shape)
    results = {}
    for weight_type in ("ivm", "exptime"):
        acc = MosaicAccumulator(grid, n_inputs=2, weight_type=weight_type)
        acc.add(image(np.full(shape, 2.0), w1, var=1.0, t=100.0, group="a"))
        acc.add(image(np.full(shape, 8.0), w2, var=3.0, t=300.0, group="b"))
        results[weight_type] = acc.finalize()
    # output pixels fully covered by both inputs (edge pixels get partial, unequal weights)
    both = np.isclose(results["ivm"].wht, np.nanmax(results["ivm"].wht), rtol=1e-5)
    assert both.sum() > 100
    np.testing.assert_allclose(results["ivm"].sci[both], (2 / 1 + 8 / 3) / (1 + 1 / 3), rtol=1e-5)
    np.testing.assert_allclose(results["ivm"].variances["var_rnoise"][both], 1 / (1 + 1 / 3), rtol=1e-5)
    np.testing.assert_allclose(results["exptime"].sci[both], (2 * 100 + 8 * 300) / 400, rtol=1e-5)
    np.testing.assert_allclose(results["exptime"].variances["var_rnoise"][both],
                               (1 * 100 ** 2 + 3 * 300 ** 2) / 400 ** 2, rtol=1e-5)


def test_ivm_smed_weights_science_and_variances_alike():
    """Exposure a (VAR_RNOISE 1) has one noisy pixel (VAR_RNOISE 9); b has 3 everywhere. ivm-smed
    weighs a by 1 and b by 1/3 everywhere — the science is the uniform answer even on the noisy
    pixel — and combines the resampled variances with those same weights."""
    shape = (16, 16)
    w1, w2 = tan_wcs(shape), tan_wcs(shape, shift=(0.5, 0.25))
    grid = grid_over(w1, w2, shape=shape)
    a = image(np.full(shape, 2.0), w1, var=1.0, group="a")
    a.var_rnoise[8, 8] = 9.0
    b = image(np.full(shape, 8.0), w2, var=3.0, group="b")
    out = {}
    for weight_type in ("ivm-smed", "ivm"):
        acc = MosaicAccumulator(grid, n_inputs=2, weight_type=weight_type)
        acc.add(a)
        acc.add(b)
        out[weight_type] = acc.finalize()
    alone = MosaicAccumulator(grid, n_inputs=1, weight_type="ivm-smed")
    alone.add(a)
    rn_a = alone.finalize().variances["var_rnoise"]            # a's VAR_RNOISE resampled
    smed = out["ivm-smed"]
    both = np.isclose(smed.wht, np.nanmax(smed.wht), rtol=1e-5)
    assert both.sum() > 100
    np.testing.assert_allclose(smed.sci[both], (2 / 1 + 8 / 3) / (1 + 1 / 3), rtol=1e-5)
    np.testing.assert_allclose(smed.variances["var_rnoise"][both], (rn_a[both] + 3 / 9) / (4 / 3) ** 2, rtol=1e-5)
    noisy = both & (rn_a > 1.01)
    assert noisy.any()                                            # where ivm down-weights a's noisy pixel
    assert np.all(out["ivm"].sci[noisy] > smed.sci[noisy] + 0.1)


def test_dq_masking_sky_level_and_context():
    shape = (12, 12)
    w = tan_wcs(shape)
    grid = grid_over(w, shape=shape)
    sci = np.full(shape, 10.0, np.float32)
    dq = np.zeros(shape, np.uint32)
    sci[5, 5], dq[5, 5] = 1e6, DNU            # excluded
    sci[6, 6], dq[6, 6] = 20.0, JUMP          # kept: JUMP_DET is a good bit for resample
    acc = MosaicAccumulator(grid, n_inputs=1, pixfrac=1.0)
    acc.add(image(sci, w, dq=dq, level=4.0))  # sky level recorded, not subtracted: drizzle removes it
    out = acc.finalize()
    assert np.nanmax(out.sci) < 20.0 and np.nanmax(out.sci) > 6.0
    np.testing.assert_allclose(np.nanmedian(out.sci), 6.0, rtol=1e-6)
    assert set(np.unique(out.con)) <= {0, 1}


def test_pixel_map_chunks_and_blot_of_a_linear_image():
    shape = (30, 25)
    w_in = tan_wcs(shape, shift=(2.3, -1.7), rot_deg=20.0)
    grid = grid_over(tan_wcs(shape), w_in, shape=shape)
    whole = pixel_map(w_in, grid.wcs, shape)
    np.testing.assert_array_equal(full_pixel_map(w_in, grid.wcs, shape, chunk_pixels=60), whole)
    gy, gx = np.mgrid[0:grid.shape[0], 0:grid.shape[1]]
    linear = (2.0 * gx + 3.0 * gy).astype(np.float32)
    blotted = blot(linear, grid.wcs, w_in, shape, chunk_pixels=100)
    with PixmapCache() as cache:
        again = blot(linear, grid.wcs, w_in, shape, pixmap=cache.get("a", w_in, grid, shape))
        np.testing.assert_array_equal(cache.get("a", w_in, grid, shape), whole)
        assert cache.computed == 1
    np.testing.assert_array_equal(blotted, again)
    expected = 2.0 * whole[..., 0] + 3.0 * whole[..., 1]
    inside = (np.isfinite(blotted) & (whole[..., 0] > 0.5) & (whole[..., 0] < grid.shape[1] - 1.5)
              & (whole[..., 1] > 0.5) & (whole[..., 1] < grid.shape[0] - 1.5))   # interpolation interior
    assert inside.sum() > 0.8 * blotted.size
    np.testing.assert_allclose(blotted[inside], expected[inside], atol=2e-3)


def test_scratch_store_keeps_nothing_on_disk_and_smooths_once(tmp_path, monkeypatch):
    from calstream.steps import resample as rs

    calls = []
    real = rs.smoothed_variance
    monkeypatch.setattr(rs, "smoothed_variance", lambda var, *a: calls.append(1) or real(var, *a))
    var = np.random.default_rng(1).uniform(1.0, 2.0, (50, 40)).astype(np.float32)
    with PixmapCache(tmp_path) as cache:
        assert list(tmp_path.iterdir()) == []                  # an unlinked file: no leftovers if killed
        first = cache.weighting_variance("0", var, "ivm-smed")
        again = cache.weighting_variance("0", var * 5, "ivm-smed")   # the first VAR_RNOISE decides
        np.testing.assert_array_equal(first, real(var)) and np.testing.assert_array_equal(again, first)
        assert len(calls) == 1
        assert cache.weighting_variance("0", var, "ivm") is var and cache.weighting_variance("0", var, "exptime") is None


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------

def test_output_grid_covers_the_inputs_north_up_and_pixel_scale():
    shape = (40, 30)
    wa, wb = tan_wcs(shape, rot_deg=30.0), tan_wcs(shape, shift=(10.0, -6.0), rot_deg=30.0)
    grid = grid_over(wa, wb, shape=shape)
    for w in (wa, wb):
        x, y = grid.wcs.invert(*footprint(w).T, with_bounding_box=False)
        assert np.all(x > -1.0) and np.all(y > -1.0)
        assert np.all(x < grid.shape[1]) and np.all(y < grid.shape[0])
    assert abs(grid.pixel_scale - SCALE) < 1e-6
    north = grid_over(wa, wb, shape=shape, rotation=0.0)
    np.testing.assert_allclose(north.pc, [[-1.0, 0.0], [0.0, 1.0]], atol=1e-12)
    coarse = grid_over(wa, shape=shape, pixel_scale=0.062)
    assert coarse.pixel_scale == pytest.approx(0.062) and coarse.pixel_scale_ratio == pytest.approx(2.0, rel=1e-4)
    fixed = grid_over(wa, shape=shape, output_shape=(50, 60), crpix=(10.0, 20.0), crval=CRVAL)
    assert fixed.shape == (50, 60) and fixed.crpix == pytest.approx((10.0, 20.0), abs=1e-6)
    info = fixed.fits_wcsinfo()
    assert info["crpix1"] == pytest.approx(11.0, abs=1e-6) and info["ctype1"] == "RA---TAN"


def test_spherical_area_and_mean_pixel_area():
    side = 0.01   # deg, a square at the equator
    ra = np.array([0.0, side, side, 0.0])
    dec = np.array([0.0, 0.0, side, side])
    assert spherical_polygon_area(ra, dec, (side / 2, side / 2)) == pytest.approx(math.radians(side) ** 2, rel=1e-5)
    area = mean_pixel_area(tan_wcs((50, 40)), (50, 40))
    assert area == pytest.approx((SCALE / 206264.80624709636) ** 2, rel=1e-6)


def test_error_from_variances_nan_handling():
    a = np.array([[1.0, np.nan, np.nan]], np.float32)
    b = np.array([[3.0, 4.0, np.nan]], np.float32)
    err = error_from_variances([a, b])
    assert err[0, 0] == 2.0 and err[0, 1] == 2.0 and np.isnan(err[0, 2])


# ---------------------------------------------------------------------------------------------
# Parity with jwst's ResampleStep
# ---------------------------------------------------------------------------------------------

@pytest.mark.parity
def test_parity_with_jwst_resample_step(image3_field):
    pytest.importorskip("jwst")
    from jwst.resample import ResampleStep

    from calstream.steps.calimage import read_cal_arrays, read_cal_info, resample_input
    from calstream.steps.synth.crds_cache import pinned_crds_env

    infos = [read_cal_info(p) for p in image3_field.cal_paths]
    grid = output_grid([footprint(i.wcs) for i in infos], infos[0].wcs, infos[0].reference, infos[0].shape)
    acc = MosaicAccumulator(grid, n_inputs=len(infos))
    for info in infos:
        acc.add(resample_input(info, read_cal_arrays(info.path)))
    ours = acc.finalize()
    with pinned_crds_env(image3_field.crds_root, image3_field.context):
        theirs = ResampleStep.call(str(image3_field.asn_path))
    assert theirs.data.shape == grid.shape
    assert theirs.meta.wcsinfo.crpix1 == pytest.approx(grid.crpix[0] + 1, abs=1e-9)
    for name, a, b in (("sci", ours.sci, theirs.data), ("wht", ours.wht, theirs.wht), ("err", ours.err, theirs.err),
                       ("var_rnoise", ours.variances["var_rnoise"], theirs.var_rnoise),
                       ("var_poisson", ours.variances["var_poisson"], theirs.var_poisson)):
        assert np.array_equal(np.isnan(a), np.isnan(b)), name
        good = np.isfinite(a)
        scale = np.nanmedian(np.abs(b[good])) + 1e-30
        assert np.max(np.abs(a[good] - b[good])) <= 1e-6 * scale + 1e-6 * np.abs(b[good]).max(), name
    np.testing.assert_array_equal(ours.con, theirs.con)
    assert ours.exposure_time == pytest.approx(theirs.meta.exposure.exposure_time)
