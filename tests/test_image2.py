"""calwebb_image2 (rate -> cal) for NIRCam imaging: kernels, CLI, parity with jwst's Image2Pipeline.

The rate input is synthesized directly (random DN/s arrays with the session SUB160 uncal's
headers and pointing), so this file does not depend on running detector1.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from calstream.steps import dqflags
from calstream.steps.image2 import (ImageArrays, Pointing, apply_flat, apply_photom, flag_invalid, imaging_wcs,
                                    photom_conversion, prepare_flat, v2v3_to_sky_model,
                                    velocity_aberration_model)

DNU, NOFLAT = int(dqflags.DO_NOT_USE), int(dqflags.NO_FLAT_FIELD)
CONTEXT = "jwst_0002.pmap"


def _arrays(sci, var_p, var_r, dq=None) -> ImageArrays:
    sci = np.asarray(sci, np.float32)
    var_p, var_r = np.asarray(var_p, np.float32), np.asarray(var_r, np.float32)
    err = np.sqrt(var_p + var_r).astype(np.float32)
    dq = np.zeros(sci.shape, np.uint32) if dq is None else np.asarray(dq, np.uint32)
    return ImageArrays(sci.copy(), err, dq.copy(), var_p.copy(), var_r.copy())


# ---------------------------------------------------------------------------------------------
# Kernels with known answers
# ---------------------------------------------------------------------------------------------

def test_prepare_flat_flags_bad_values() -> None:
    flat = np.array([[2.0, np.nan, 0.0, 0.5, 4.0]], np.float32)
    fdq = np.array([[0, 0, 0, NOFLAT, DNU]], np.uint32)
    value, dq = prepare_flat(flat, fdq)
    assert value.tolist() == [[2.0, 1.0, 1.0, 1.0, 1.0]]
    assert dq.tolist() == [[0, DNU | NOFLAT, DNU | NOFLAT, DNU | NOFLAT, DNU]]
    assert np.isnan(flat[0, 1]) and fdq[0, 3] == NOFLAT      # inputs untouched


def test_apply_flat_known_answer() -> None:
    arrays = _arrays([[8.0, 3.0]], [[4.0, 1.0]], [[16.0, 2.0]])
    flat, fdq = prepare_flat(np.array([[2.0, 0.5]], np.float32), np.zeros((1, 2), np.uint32))
    apply_flat(arrays, flat, np.array([[0.2, 0.05]], np.float32), fdq)
    # sci 8/2 = 4, 3/0.5 = 6; var_flat = sci^2/flat^2*ferr^2 = 16/4*0.04 = 0.16, 36/0.25*0.0025 = 0.36
    np.testing.assert_allclose(arrays.sci, [[4.0, 6.0]], rtol=1e-7)
    np.testing.assert_allclose(arrays.var_flat, [[0.16, 0.36]], rtol=1e-6)
    np.testing.assert_allclose(arrays.var_poisson, [[1.0, 4.0]], rtol=1e-7)
    np.testing.assert_allclose(arrays.var_rnoise, [[4.0, 8.0]], rtol=1e-7)
    np.testing.assert_allclose(arrays.err, np.sqrt([[5.16, 12.36]]), rtol=1e-6)
    assert arrays.var_flat.dtype == np.float32 and arrays.err.dtype == np.float32


def test_apply_flat_bad_flat_pixel_is_uncorrected_and_invalid() -> None:
    arrays = _arrays([[8.0, 8.0]], [[4.0, 4.0]], [[1.0, 1.0]])
    flat, fdq = prepare_flat(np.array([[2.0, 0.0]], np.float32), np.zeros((1, 2), np.uint32))
    apply_flat(arrays, flat, np.zeros((1, 2), np.float32), fdq)
    assert arrays.sci[0, 0] == 4.0 and np.isnan(arrays.sci[0, 1])
    assert arrays.dq.tolist() == [[0, DNU | NOFLAT]]
    for a in (arrays.err, arrays.var_poisson, arrays.var_rnoise, arrays.var_flat):
        assert np.isnan(a[0, 1]) and not np.isnan(a[0, 0])


def test_flag_invalid_syncs_nans_and_do_not_use() -> None:
    arrays = _arrays([[1.0, np.nan, 3.0]], [[1.0, 1.0, np.nan]], [[1.0, 1.0, 1.0]], dq=[[DNU, 0, 0]])
    flag_invalid(arrays)
    assert arrays.dq.tolist() == [[DNU, DNU, DNU]]
    assert np.isnan(arrays.sci).all() and np.isnan(arrays.err).all()


def test_flat_on_row_chunks_equals_whole_frame() -> None:
    rng = np.random.default_rng(1)
    sci = rng.normal(5, 2, (12, 7)).astype(np.float32)
    vp, vr = rng.uniform(0.1, 2, (2, 12, 7)).astype(np.float32)
    flat = rng.uniform(0.8, 1.2, (12, 7)).astype(np.float32)
    flat[3, 4] = np.nan
    ferr = rng.uniform(0, 0.02, (12, 7)).astype(np.float32)
    whole = _arrays(sci, vp, vr)
    fv, fdq = prepare_flat(flat, np.zeros((12, 7), np.uint32))
    apply_flat(whole, fv, ferr, fdq)
    for y0 in range(0, 12, 5):
        part = _arrays(sci[y0:y0 + 5], vp[y0:y0 + 5], vr[y0:y0 + 5])
        fv, fdq = prepare_flat(flat[y0:y0 + 5], np.zeros_like(part.dq))
        apply_flat(part, fv, ferr[y0:y0 + 5], fdq)
        for name in ("sci", "err", "dq", "var_poisson", "var_rnoise", "var_flat"):
            np.testing.assert_array_equal(getattr(part, name), getattr(whole, name)[y0:y0 + 5])


def test_apply_photom_known_answer() -> None:
    arrays = _arrays([[2.0, -1.0]], [[4.0, 1.0]], [[9.0, 0.0]])
    arrays.var_flat = np.array([[1.0, 0.5]], np.float32)
    apply_photom(arrays, 0.5)
    assert arrays.sci.tolist() == [[1.0, -0.5]]
    np.testing.assert_allclose(arrays.err, 0.5 * np.sqrt([[13.0, 1.0]]), rtol=1e-6)
    assert arrays.var_poisson.tolist() == [[1.0, 0.25]]
    assert arrays.var_rnoise.tolist() == [[2.25, 0.0]]
    assert arrays.var_flat.tolist() == [[0.25, 0.125]]


def test_photom_conversion_row_matching() -> None:
    table = np.array([(b"F200W", b"CLEAR", 0.21), (b"F150W", b"CLEAR", 0.27), (b"F200W", b"MASKRND", 9.0)],
                     dtype=[("filter", "S8"), ("pupil", "S8"), ("photmjsr", "<f4")])
    assert photom_conversion(table, "F200W", "CLEAR") == np.float32(0.21)
    assert photom_conversion(table, "f150w", "clear") == np.float32(0.27)
    assert photom_conversion(table, "F444W", "CLEAR") is None


def test_velocity_aberration_scales_about_reference_point() -> None:
    model = velocity_aberration_model(1.001, 100.0, -500.0)
    v2, v3 = model(100.0, -500.0)
    assert v2 == pytest.approx(100.0, abs=1e-12) and v3 == pytest.approx(-500.0, abs=1e-12)
    v2, v3 = model(110.0, -500.0)
    assert v2 == pytest.approx(100.0 + 10.0 * 1.001, abs=1e-9)
    assert velocity_aberration_model(None, 1.0, 2.0)(3.0, 4.0) == (3.0, 4.0)


def test_reference_point_lands_on_ra_dec_ref() -> None:
    p = Pointing(ra_ref=53.16, dec_ref=-27.78, roll_ref=45.04, v2_ref=90.96, v3_ref=-498.71)
    ra, dec = v2v3_to_sky_model(p)(p.v2_ref, p.v3_ref)
    assert ra == pytest.approx(53.16, abs=1e-10) and dec == pytest.approx(-27.78, abs=1e-10)


def test_imaging_wcs_subarray_offset_and_inverse() -> None:
    from astropy.modeling import models

    # a linear "distortion": full-frame pixel -> V2V3 arcsec at 0.1"/px about (100, -500)
    dist = (models.Shift(-1023.5) & models.Shift(-1023.5)) | (models.Scale(0.1) & models.Scale(0.1)) \
        | (models.Shift(100.0) & models.Shift(-500.0))
    p = Pointing(10.0, 20.0, 0.0, 100.0, -500.0)
    wcs = imaging_wcs(p, dist, xstart=1024, ystart=1024, nx=64, ny=64, filter_offset=(0.5, 0.0))
    # subarray pixel (0, 0) is full-frame (1023, 1023); (1023.5 with the +0.5 filter offset, 1023.5) is the centre
    v2, v3 = wcs.get_transform("detector", "v2v3")(0.0, 0.5)
    assert (v2, v3) == pytest.approx((100.0, -500.0), abs=1e-9)
    ra, dec = wcs(0.0, 0.5)
    assert (ra, dec) == pytest.approx((10.0, 20.0), abs=1e-9)
    x, y = wcs.invert(*wcs(10.0, 20.0))
    assert (x, y) == pytest.approx((10.0, 20.0), abs=1e-6)
    assert np.isnan(wcs(100.0, 5.0)[0])      # outside the bounding box


# ---------------------------------------------------------------------------------------------
# A synthetic rate on the session's SUB160 exposure
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rate_file(crds_cache, tmp_path_factory) -> Path:
    """A NRCA1 SUB160 rate product: random DN/s with a few NaN / DO_NOT_USE pixels."""
    from calstream.steps.synth.stage2 import write_synthetic_rate

    path = write_synthetic_rate(tmp_path_factory.mktemp("image2_rate"), detector="NRCA1", subarray="SUB160")
    assert path.name == "jw01234001001_02101_00001_nrca1_rate.fits"
    return path


def _cli(*args: str) -> int:
    from calstream.daemon.cli import main

    return main(list(args))


def test_cli_calwebb_image2_writes_a_valid_cal(rate_file: Path, tmp_path: Path, capsys) -> None:
    from stdatamodels.jwst.datamodels import ImageModel

    from calstream.steps.synth.stage2 import photmjsr

    assert _cli("run", "calwebb_image2", str(rate_file), "--output-dir", str(tmp_path),
                "--crds-context", CONTEXT) == 0
    cal = tmp_path / "jw01234001001_02101_00001_nrca1_cal.fits"
    assert str(cal) in capsys.readouterr().out
    with ImageModel(str(cal)) as model:
        model.validate()
        assert model.meta.bunit_data == "MJy/sr" and model.meta.bunit_err == "MJy/sr"
        assert model.meta.photometry.conversion_megajanskys == pytest.approx(photmjsr("NRCA1", "F200W"), rel=1e-6)
        assert model.meta.photometry.pixelarea_steradians > 0
        assert model.area.shape == (160, 160) and model.var_flat.shape == (160, 160)
        ra, dec = model.meta.wcs(79.5, 79.5)
        assert abs(ra - 53.16) < 0.01 and abs(dec + 27.78) < 0.01
        assert model.meta.wcsinfo.s_region.startswith("POLYGON ICRS")
        rate_dq = fits.getdata(rate_file, "DQ")
        assert (rate_dq & DNU).any() and (model.dq[(rate_dq & DNU) != 0] & DNU).all()
        assert np.isnan(model.data[(rate_dq & DNU) != 0]).all()
        assert np.isfinite(model.data).mean() > 0.99
    header = fits.getheader(cal)
    assert header["FILENAME"] == cal.name
    assert header["S_WCS"] == header["S_FLAT"] == header["S_PHOTOM"] == "COMPLETE"
    assert header["S_RESAMP"] == header["S_BKDSUB"] == "SKIPPED"
    assert header["R_FLAT"].startswith("crds://jwst_nircam_flat_")
    assert header["R_DISTOR"].startswith("crds://jwst_nircam_distortion_")
    assert header["R_PHOTOM"].startswith("crds://") and header["CRDS_CTX"] == CONTEXT
    assert fits.getheader(cal, "SCI")["BUNIT"] == "MJy/sr"


def test_cli_errors(rate_file: Path, sub160_uncal: Path, tmp_path: Path) -> None:
    """Bad input -> 3, missing reference -> 4, not implemented -> 5, bad parameter -> 2."""
    base = ("--output-dir", str(tmp_path), "--crds-context", CONTEXT)
    assert _cli("run", "calwebb_image2", str(tmp_path / "missing_rate.fits"), *base) == 3
    assert _cli("run", "calwebb_image2", str(sub160_uncal), *base) == 3            # not a rate product
    assert _cli("run", "calwebb_image2", str(rate_file), *base, "--steps.resample.skip=false",
                "--steps.resample.single=true") == 5
    assert _cli("run", "calwebb_image2", str(rate_file), *base, "--steps.photom.nonsense=1") == 2
    assert _cli("run", "calwebb_image2", str(rate_file), *base,
                f"--steps.flat_field.override_flat={tmp_path / 'nope.fits'}") == 4
    no_pointing = tmp_path / "nopoint_rate.fits"
    with fits.open(rate_file) as hdul:
        del hdul["SCI"].header["RA_REF"]
        hdul.writeto(no_pointing)
    assert _cli("run", "calwebb_image2", str(no_pointing), *base) == 3
    assert not list(tmp_path.glob("*_cal.fits"))


def test_skipped_flat_leaves_no_var_flat(rate_file: Path, tmp_path: Path) -> None:
    assert _cli("run", "calwebb_image2", str(rate_file), "--output-dir", str(tmp_path),
                "--crds-context", CONTEXT, "--steps.flat_field.skip=true") == 0
    cal = tmp_path / "jw01234001001_02101_00001_nrca1_cal.fits"
    with fits.open(cal) as hdul:
        assert hdul[0].header["S_FLAT"] == "SKIPPED"
        rate = fits.getdata(rate_file, "SCI")
        ok = np.isfinite(rate)
        np.testing.assert_allclose(hdul["SCI"].data[ok], rate[ok] * np.float32(hdul["SCI"].header["PHOTMJSR"]),
                                   rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Parity with jwst's Image2Pipeline (resample skipped)
# ---------------------------------------------------------------------------------------------

def _crds_env(root: Path):
    """CRDS_PATH=root and CRDS_CONTEXT pinned for jwst (calstream also gets context=...)."""
    from calstream.steps.synth.crds_cache import pinned_crds_env

    return pinned_crds_env(root, CONTEXT)


PARITY_CASES = [("NRCA1", "SUB160", None), ("NRCB1", "SUB640", 1.00003)]


@pytest.mark.parity
@pytest.mark.parametrize("detector,subarray,va_scale", PARITY_CASES, ids=["nrca1-sub160", "nrcb1-sub640-va"])
def test_parity_with_jwst_image2(crds_cache, tmp_path: Path, record_property, detector: str, subarray: str,
                                 va_scale: float | None) -> None:
    pipeline = pytest.importorskip("jwst.pipeline")
    from stdatamodels.jwst.datamodels import ImageModel

    from calstream.steps.image2 import calibrate_rate_file
    from calstream.steps.synth.stage2 import write_synthetic_rate

    rate_file = write_synthetic_rate(tmp_path / "in", detector=detector, subarray=subarray, va_scale=va_scale)
    with _crds_env(crds_cache.root):
        start = time.perf_counter()
        ours = calibrate_rate_file(rate_file, tmp_path, context=CONTEXT)
        t_ours = time.perf_counter() - start
        start = time.perf_counter()
        with ImageModel(str(rate_file)) as rate:
            theirs = pipeline.Image2Pipeline.call(rate, steps={"resample": {"skip": True}})[0]
        t_jwst = time.perf_counter() - start
    record_property("seconds_calstream", round(t_ours, 3))
    record_property("seconds_jwst", round(t_jwst, 3))
    with ImageModel(str(ours.products["cal"])) as mine:
        if va_scale is not None:
            assert mine.meta.velocity_aberration.scale_factor == va_scale
        for ext in ("data", "err", "var_poisson", "var_rnoise", "var_flat", "area"):
            a, b = getattr(mine, ext), getattr(theirs, ext)
            assert np.array_equal(np.isnan(a), np.isnan(b)), ext
            ok = np.isfinite(b)
            rel = np.max(np.abs(a[ok] - b[ok]) / np.maximum(np.abs(b[ok]), 1e-30))
            record_property(f"max_rel_{ext}", float(rel))
            assert rel <= 1e-4, (ext, rel)
        np.testing.assert_array_equal(mine.dq, theirs.dq)
        ny, nx = mine.data.shape
        yy, xx = np.mgrid[-0.5:ny:ny / 20, -0.5:nx:nx / 20]
        ra1, dec1 = mine.meta.wcs(xx, yy)
        ra2, dec2 = theirs.meta.wcs(xx, yy)
        assert np.array_equal(np.isnan(ra1), np.isnan(ra2)) and np.isfinite(ra2).all()
        sep_mas = np.hypot((ra1 - ra2) * np.cos(np.radians(dec2)), dec1 - dec2) * 3.6e6
        record_property("max_wcs_mas", float(np.max(sep_mas)))
        assert np.max(sep_mas) < 1.0
        assert mine.meta.photometry.conversion_megajanskys == theirs.meta.photometry.conversion_megajanskys
        assert mine.meta.photometry.pixelarea_steradians == theirs.meta.photometry.pixelarea_steradians
        assert mine.meta.bunit_data == theirs.meta.bunit_data
        for key in ("crval1", "crval2", "cd1_1", "cd1_2", "cd2_1", "cd2_2", "crpix1", "crpix2"):
            assert mine.meta.wcsinfo.instance[key] == pytest.approx(theirs.meta.wcsinfo.instance[key],
                                                                    rel=1e-9, abs=1e-12), key
        assert mine.meta.wcsinfo.s_region == theirs.meta.wcsinfo.s_region
        for step in ("assign_wcs", "flat_field", "photom"):
            assert getattr(mine.meta.cal_step, step) == getattr(theirs.meta.cal_step, step) == "COMPLETE"
        for reftype in ("distortion", "filteroffset", "flat", "photom", "area"):
            assert getattr(mine.meta.ref_file, reftype).name == getattr(theirs.meta.ref_file, reftype).name
    theirs.close()


def test_parameter_file_skips_photom(rate_file: Path, tmp_path: Path) -> None:
    config = tmp_path / "image2.toml"
    config.write_text("[steps.photom]\nskip = true\n[steps.assign_wcs]\nsip_npoints = 8\n")
    assert _cli("run", "calwebb_image2", str(rate_file), "--output-dir", str(tmp_path), "--crds-context", CONTEXT,
                "--config", str(config)) == 0
    cal = tmp_path / "jw01234001001_02101_00001_nrca1_cal.fits"
    assert fits.getheader(cal)["S_PHOTOM"] == "SKIPPED" and fits.getheader(cal)["S_FLAT"] == "COMPLETE"
    assert fits.getheader(cal, "SCI")["BUNIT"] == "DN/s"
    assert "R_PHOTOM" not in fits.getheader(cal)
