"""Tests of the synthetic data generator (calstream.steps.synth)."""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from calstream.steps import dqflags
from calstream.steps.synth import crds_cache as cc
from calstream.steps.synth import detector as det
from calstream.steps.synth import exposures as ex
from calstream.steps.synth import references as refs
from calstream.steps.synth import scene as sc

# --------------------------------------------------------------------------------------
# Geometry and timing
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("detector, name, start", [
    ("NRCA1", "FULL", (1, 1)), ("NRCB1", "FULL", (1, 1)),
    ("NRCA1", "SUB640", (1409, 1409)), ("NRCB1", "SUB640", (1, 1)),
    ("NRCA1", "SUB320", (1729, 1729)), ("NRCB1", "SUB320", (1, 1)),
    ("NRCA1", "SUB160", (1889, 1889)), ("NRCB1", "SUB160", (1, 1)),
    ("NRCB1", "SUB400P", (1649, 1649)), ("NRCA3", "SUB64P", (1, 101)),
])
def test_subarray_substrt(detector, name, start):
    sub = det.subarray_for(detector, name)
    assert (sub.xstart, sub.ystart) == start
    assert sub.x0 + sub.xsize <= 2048 and sub.y0 + sub.ysize <= 2048


@pytest.mark.parametrize("name, tframe", [
    ("FULL", 10.73676), ("SUB640", 4.18584), ("SUB320", 1.06904), ("SUB160", 0.27864),
    ("SUB64P", 0.05016), ("SUB400P", 1.65624), ("SUBGRISM256", 1.34669),
])
def test_frame_times(name, tframe):
    assert det.frame_time(det.subarray_for("NRCA1", name)) == pytest.approx(tframe, abs=2e-5)


def test_detector_axes_and_unknown_names():
    a1, b1 = det.detector_info("NRCA1"), det.detector_info("nrcb1")
    assert (a1.fastaxis, a1.slowaxis, a1.module, a1.channel) == (-1, 2, "A", "SHORT")
    assert (b1.fastaxis, b1.slowaxis, b1.module) == (1, -2, "B")
    assert det.detector_info("NRCALONG").channel == "LONG"
    with pytest.raises(KeyError):
        det.detector_info("NRCC1")
    with pytest.raises(KeyError):
        det.subarray_for("NRCA1", "SUB999")
    with pytest.raises(KeyError):
        det.read_pattern("SLOWEST")


def test_read_patterns():
    med8 = det.read_pattern("MEDIUM8")
    assert (med8.nframes, med8.groupgap) == (8, 2)
    assert med8.total_frames(3) == 3 * 8 + 2 * 2
    np.testing.assert_array_equal(med8.read_frames(2), [list(range(8)), list(range(10, 18))])
    assert det.read_pattern("deep2").total_frames(20) == 20 * 2 + 19 * 18
    assert det.read_pattern("RAPID").read_frames(3).tolist() == [[0], [1], [2]]


def test_readout_columns_amplifiers_and_parity():
    info = det.detector_info("NRCA1")          # fastaxis -1: DMS x reversed in detector
    amp, par = det.readout_columns(info, det.subarray_for("NRCA1", "FULL"))
    assert amp[0] == 3 and amp[-1] == 0 and amp[1023] == 2 and amp[1024] == 1
    assert par[-1] == 0 and par[-2] == 1
    amp, par = det.readout_columns(info, det.subarray_for("NRCA1", "SUB160"))
    assert set(amp.tolist()) == {0}


# --------------------------------------------------------------------------------------
# Pixel maps
# --------------------------------------------------------------------------------------


def test_pixel_maps_window_is_cutout_and_deterministic():
    big = det.pixel_maps("NRCB1", 7, 0, 0, 200, 240)
    small = det.pixel_maps("NRCB1", 7, 37, 101, 50, 60)
    again = det.pixel_maps("NRCB1", 7, 37, 101, 50, 60)
    other = det.pixel_maps("NRCB1", 8, 37, 101, 50, 60)
    for name in ("superbias", "gain", "readnoise", "dark_rate", "qe", "coeffs", "well",
                 "sat_thresh", "mask_dq", "sat_dq", "lin_dq", "is_ref"):
        cut = getattr(big, name)[..., 37:87, 101:161]
        np.testing.assert_array_equal(getattr(small, name), cut, err_msg=name)
        np.testing.assert_array_equal(getattr(small, name), getattr(again, name))
    assert not np.array_equal(small.superbias, other.superbias)


def test_pixel_maps_statistics_and_flags():
    m = det.pixel_maps("NRCA1", 0, 0, 0, 512, 512)
    ref = m.is_ref
    assert ref[:4].all() and ref[:, :4].all() and not ref[4:, 4:].any()
    assert np.all(m.mask_dq[ref] == dqflags.REFERENCE_PIXEL)
    assert np.all(m.qe[ref] == 0) and np.all(m.dark_rate[ref] == 0)
    light = ~ref
    p = det.DetectorParams()
    assert np.median(m.gain[light]) == pytest.approx(p.gain_sw, rel=0.05)
    assert np.median(m.readnoise[light]) == pytest.approx(p.rn_cds_sw, rel=0.15)
    assert np.median(m.dark_rate[light] * m.gain[light]) == pytest.approx(p.dark_e, rel=0.1)
    n = light.sum()
    hot = (m.mask_dq & dqflags.HOT) > 0
    dead = (m.mask_dq & dqflags.DEAD) > 0
    assert 0.3 * p.hot_fraction * n < hot.sum() < 3 * p.hot_fraction * n
    assert np.all(m.qe[dead] == 0) and np.all(m.mask_dq[dead] & dqflags.DO_NOT_USE)
    assert np.all(m.dark_rate[hot] * m.gain[hot] >= 0.5)        # hot pixels are in the dark
    assert np.array_equal(hot, (m.dark_dq & dqflags.HOT) > 0)
    nosat = (m.sat_dq & dqflags.NO_SAT_CHECK) > 0
    assert np.all(np.isnan(m.sat_thresh[nosat])) and np.isfinite(m.sat_thresh[~nosat]).all()
    nolin = (m.lin_dq & dqflags.NO_LIN_CORR) > 0
    assert np.all(m.coeffs[2:, nolin] == 0) and np.all(m.coeffs[1, nolin] == 1)
    # saturation threshold sits below the hard full well above bias
    good = ~nosat
    assert np.all(m.sat_thresh[good] < m.superbias[good] + m.well[good])

def test_pixel_maps_amplifier_structure():
    m = det.pixel_maps("NRCA1", 0, 100, 0, 32, 2048)
    amp, _ = det.readout_columns(det.detector_info("NRCA1"), det.subarray_for("NRCA1", "FULL"))
    levels = [np.median(m.superbias[:, amp == a]) for a in range(4)]
    gains = [np.median(m.gain[:, amp == a]) for a in range(4)]
    assert max(levels) - min(levels) > 100           # per-output bias offsets
    assert max(gains) - min(gains) > 0.01             # per-output gains
    # within an output the bias is flat to the pixel scatter
    assert abs(np.median(m.superbias[:, 600:700]) - np.median(m.superbias[:, 900:1000])) < 30


def test_invert_linearity_known_answers():
    lin = np.array([[0.0, 100.0, 20000.0, 1e6]], dtype=np.float32)
    coeffs = np.zeros((5, 1, 4), dtype=np.float32)
    coeffs[1] = 1.0
    coeffs[2] = 2.5e-6
    well = np.full((1, 4), 40000.0, dtype=np.float32)
    out = np.empty_like(lin)
    det.invert_linearity(lin, coeffs, well, out)
    c2 = 2.5e-6
    expect = (-1 + np.sqrt(1 + 4 * c2 * lin[0, :3].astype(float))) / (2 * c2)
    np.testing.assert_allclose(out[0, :3], expect, rtol=1e-6, atol=1e-3)
    assert out[0, 3] == 40000.0                      # clipped at the full well
    coeffs[:, 0, 1] = np.nan                          # NaN coefficients: linear
    det.invert_linearity(lin, coeffs, well, out)
    assert out[0, 1] == 100.0


def test_gain_change_factor():
    assert det.gain_factor("NRCA1", "2023-12-31T23:59:59") == 1.0
    assert det.gain_factor("NRCA1", "2024-01-01 00:00:00") == det.GAIN_CHANGE.factor
    assert det.gain_factor("NRCB1", "2025-01-01T00:00:00") == 1.0


# --------------------------------------------------------------------------------------
# Ramp kernels
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.0, 0.7, 12.0, 60.0])
def test_accumulate_charge_poisson_moments(lam):
    rng = np.random.default_rng(3)
    shape = (200, 500)
    charge = np.zeros(shape, dtype=np.float32)
    rate = np.full(shape, lam / 2.0, dtype=np.float32)
    ex.accumulate_charge(charge, rate, 2.0, rng.random(shape, dtype=np.float32),
                         rng.standard_normal(shape, dtype=np.float32))
    assert np.all(charge == np.round(charge)) and charge.min() >= 0
    if lam == 0:
        assert charge.max() == 0
    else:
        assert charge.mean() == pytest.approx(lam, rel=0.02, abs=0.01)
        assert charge.var() == pytest.approx(lam, rel=0.05)


def test_quantize_rounds_and_clips():
    acc = np.array([[-5.0, 0.49, 1.5, 70000.0, 131070.0]], dtype=np.float32)
    out = np.empty(acc.shape, dtype=np.uint16)
    ex.quantize(acc, 1.0, out)
    assert out.tolist() == [[0, 0, 2, 65535, 65535]]
    ex.quantize(acc, 0.5, out)
    assert out.tolist() == [[0, 0, 1, 35000, 65535]]


def test_read_frame_reference_pixels_get_no_signal():
    shape = (2, 3)
    maps = det.pixel_maps("NRCA1", 0, 0, 0, *shape)       # all reference pixels
    acc = np.zeros(shape, dtype=np.float32)
    lin_well = np.empty(shape, dtype=np.float32)
    ex.linear_at_well(maps.coeffs, maps.well, lin_well)
    charge = np.full(shape, 1e4, dtype=np.float32)
    zeros = np.zeros(shape, dtype=np.float32)
    ex.read_frame(acc, charge, np.ones(shape, np.float32), maps.coeffs, maps.well, lin_well,
                  maps.superbias, np.array([1.0, 2.0], np.float32),
                  np.array([0.5, 0.0, -0.5], np.float32), zeros, zeros, maps.is_ref)
    expect = maps.superbias + np.array([[1.5, 1.0, 0.5], [2.5, 2.0, 1.5]], np.float32)
    np.testing.assert_allclose(acc, expect, rtol=1e-6)


def test_pink_noise_normalisation():
    rng = np.random.default_rng(1)
    rms = [ex.pink_noise(rng, 2049, 2.0).std() for _ in range(200)]
    assert np.sqrt(np.mean(np.square(rms))) == pytest.approx(2.0, rel=0.1)
    long = [ex.pink_noise(rng, 20490, 2.0).std() for _ in range(50)]
    assert np.mean(long) > np.mean(rms)                 # 1/f variance grows with length
    assert ex.pink_noise(rng, 10, 0.0).tolist() == [0.0] * 10


def test_cosmic_rays_avoid_reference_pixels_and_are_sorted():
    rng = np.random.default_rng(5)
    maps = det.pixel_maps("NRCA1", 0, 0, 0, 100, 100)
    noise = ex.NoiseParams(cr_rate=1e-3, snowball_fraction=0.05)
    crs = ex.draw_cosmic_rays(rng, 2, 100, 100, 20, 1.0, maps.is_ref, noise)
    assert len(crs) > 50
    assert not maps.is_ref[crs["y"], crs["x"]].any()
    assert np.all(np.diff(crs["frame"]) >= 0) and np.all(crs["integration"] == 2)
    assert crs["frame"].max() < 20 and crs["charge"].min() > 0


# --------------------------------------------------------------------------------------
# Scene and pointing
# --------------------------------------------------------------------------------------


def test_render_rate_conserves_flux():
    scene = sc.Scene(sky=0.0, sources=[
        sc.Source("star", 50.3, 60.7, 1000.0, sigma=1.2),
        sc.Source("galaxy", 120.0, 70.0, 500.0, r_eff=3.0, n=1.0, q=0.6, theta=0.4)])
    img = sc.render_rate(scene, 0, 0, 200, 200)
    assert img[40:80, 30:70].sum() == pytest.approx(1000.0, rel=1e-4)
    assert img[40:100, 90:150].sum() == pytest.approx(500.0, rel=1e-4)
    part = sc.render_rate(scene, 55, 45, 20, 20)         # window cuts the star
    np.testing.assert_allclose(part, img[55:75, 45:65], rtol=1e-5)


def test_pointing_round_trip_and_wcs():
    info = det.detector_info("NRCA1")
    sub = det.subarray_for("NRCA1", "SUB160")
    v2, v3 = sc.subarray_v2v3(info, sub)
    assert (v2, v3) == pytest.approx((91.03, -498.41), abs=0.5)   # SIAF NRCA1_SUB160
    point = sc.point_aperture(53.16, -27.78, 45.0, v2, v3)
    att = sc.attitude_matrix(point.ra_v1, point.dec_v1, point.pa_v3)
    assert sc.v2v3_to_sky(att, v2, v3) == pytest.approx((53.16, -27.78), abs=1e-9)
    wcs = sc.aperture_wcs(info, sub, point)
    x, y = np.array([3.0, 150.5]), np.array([17.0, 80.0])
    ra, dec = wcs.pixel_to_world(x, y)
    xb, yb = wcs.world_to_pixel(ra, dec)
    np.testing.assert_allclose([xb, yb], [x, y], atol=1e-8)
    # one pixel ~ 31 mas
    ra2, dec2 = wcs.pixel_to_world(np.array([4.0]), np.array([17.0]))
    sep = math.hypot((ra2[0] - ra[0]) * math.cos(math.radians(dec[0])), dec2[0] - dec[0])
    assert sep * 3600 == pytest.approx(0.031, rel=1e-3)


@pytest.mark.parity
def test_roll_matches_jwst_local_roll():
    stp = pytest.importorskip("jwst.lib.set_telescope_pointing")
    info = det.detector_info("NRCB1")
    v2, v3 = sc.subarray_v2v3(info, det.subarray_for("NRCB1", "FULL"))
    point = sc.point_aperture(150.1, 2.2, 290.0, v2, v3)
    jwst_roll = stp.compute_local_roll(point.pa_v3, point.ra_ref, point.dec_ref, v2, v3)
    assert point.roll_ref == pytest.approx(jwst_roll, abs=1e-3)


# --------------------------------------------------------------------------------------
# Reference files
# --------------------------------------------------------------------------------------


def test_dq_encode_decode_nonstandard_mask_bits():
    dq = np.array([dqflags.DO_NOT_USE | dqflags.DEAD, dqflags.REFERENCE_PIXEL, dqflags.WARM,
                   dqflags.JUMP_DET], dtype=np.uint32)
    enc = refs.encode_dq(dq, refs.MASK_DQ_DEF)
    assert enc.tolist() == [0b11, 1 << 6, 1 << 3, 0]    # JUMP_DET is not a mask flag
    dec = refs.decode_dq(enc, refs.MASK_DQ_DEF)
    assert dec.tolist() == [dqflags.DO_NOT_USE | dqflags.DEAD, dqflags.REFERENCE_PIXEL,
                            dqflags.WARM, 0]
    table = refs.dq_def_table(refs.MASK_DQ_DEF)
    assert table["VALUE"].tolist() == [1 << b for b, _, _ in refs.MASK_DQ_DEF]


def test_reference_names_are_crds_style_and_stable():
    assert refs.reference_name("gain", "NRCA1", "FULL") == "jwst_nircam_gain_0001.fits"
    assert refs.reference_name("gain", "NRCB1", "SUB160") == "jwst_nircam_gain_0306.fits"
    assert refs.reference_name("gain", "NRCA1", "SUB160", 2) == "jwst_nircam_gain_5301.fits"
    assert refs.pars_name("pars-jumpstep") == "jwst_nircam_pars-jumpstep_0001.asdf"


def _ref_path(cache, reftype, detector="NRCA1", subarray="SUB160", version=1):
    return cache.root / "references/jwst/nircam" / refs.reference_name(reftype, detector,
                                                                       subarray, version)


EXPECTED_MODELS = {"mask": "MaskModel", "saturation": "SaturationModel",
                   "superbias": "SuperBiasModel", "linearity": "LinearityModel",
                   "dark": "DarkModel", "gain": "GainModel", "readnoise": "ReadnoiseModel"}


@pytest.mark.parametrize("reftype", sorted(EXPECTED_MODELS))
def test_references_open_and_validate_with_stdatamodels(crds_cache, reftype):
    datamodels = pytest.importorskip("stdatamodels.jwst.datamodels")
    maps = det.pixel_maps("NRCA1", 0, *(lambda s: (s.y0, s.x0, s.ysize, s.xsize))(
        det.subarray_for("NRCA1", "SUB160")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # ValidationWarning -> failure
        with datamodels.open(_ref_path(crds_cache, reftype)) as model:
            model.validate()
            assert type(model).__name__ == EXPECTED_MODELS[reftype]
            assert model.meta.reftype == reftype.upper()
            assert model.meta.instrument.detector == "NRCA1"
            assert (model.meta.subarray.xstart, model.meta.subarray.ystart) == (1889, 1889)
            assert (model.meta.subarray.fastaxis, model.meta.subarray.slowaxis) == (-1, 2)
            if reftype == "mask":
                np.testing.assert_array_equal(model.dq, maps.mask_dq)   # via DQ_DEF
            elif reftype == "linearity":
                assert model.coeffs.shape == (5, 160, 160) and model.coeffs.dtype.kind == "f" and model.coeffs.dtype.itemsize == 4
                np.testing.assert_array_equal(model.coeffs, maps.coeffs)
                np.testing.assert_array_equal(model.dq, maps.lin_dq)
            elif reftype == "dark":
                assert model.data.shape[0] >= 10 and model.data.shape[1:] == (160, 160)
                assert (model.meta.exposure.nframes, model.meta.exposure.groupgap) == (1, 0)
                assert model.meta.exposure.readpatt == "RAPID"
                tf = det.frame_time(det.subarray_for("NRCA1", "SUB160"))
                np.testing.assert_allclose(model.data[3], maps.dark_rate * 4 * tf, rtol=1e-6)
                np.testing.assert_array_equal(model.dq, maps.dark_dq)
            elif reftype == "saturation":
                np.testing.assert_array_equal(model.data, maps.sat_thresh)
                np.testing.assert_array_equal(model.dq, maps.sat_dq)
            elif reftype == "superbias":
                np.testing.assert_array_equal(model.data, maps.superbias)
            elif reftype == "gain":
                np.testing.assert_array_equal(model.data, maps.gain)
            elif reftype == "readnoise":
                np.testing.assert_array_equal(model.data, maps.readnoise)


def test_reference_file_layout_on_disk(crds_cache):
    with fits.open(_ref_path(crds_cache, "mask")) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "DQ", "DQ_DEF"]
        hdr = hdul[0].header
        for key in ("TELESCOP", "INSTRUME", "DETECTOR", "REFTYPE", "USEAFTER", "PEDIGREE",
                    "DESCRIP", "AUTHOR", "HISTORY", "DATAMODL", "SUBARRAY", "SUBSTRT1",
                    "SUBSTRT2", "SUBSIZE1", "SUBSIZE2", "FASTAXIS", "SLOWAXIS"):
            assert key in hdr, key
        assert hdul["DQ"].data.dtype == np.uint32
        assert (hdul["DQ"].header["BITPIX"], hdul["DQ"].header["BZERO"]) == (32, 2147483648)
        assert hdul["DQ_DEF"].data["NAME"][6] == "REFERENCE_PIXEL"   # non-standard bit 6
        assert int(hdul["DQ"].data[-1, -1]) == 1 << 6                # border pixel
    with fits.open(_ref_path(crds_cache, "dark")) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "SCI", "ERR", "DQ", "DQ_DEF"]
        assert hdul["SCI"].header["BITPIX"] == -32 and hdul["ERR"].data.ndim == 3
        assert (hdul[0].header["READPATT"], hdul[0].header["NFRAMES"],
                hdul[0].header["GROUPGAP"]) == ("RAPID", 1, 0)
    new = fits.getdata(_ref_path(crds_cache, "gain", version=2))
    old = fits.getdata(_ref_path(crds_cache, "gain"))
    np.testing.assert_allclose(new, old * det.GAIN_CHANGE.factor, rtol=1e-6)


def test_pars_references_validate_with_stpipe(crds_cache):
    asdf = pytest.importorskip("asdf")
    config = pytest.importorskip("stpipe._config")
    from stpipe import config_parser

    for reftype, cls in (("pars-detector1pipeline", "Detector1Pipeline"),
                         ("pars-jumpstep", "JumpStep")):
        path = crds_cache.root / "references/jwst/nircam" / refs.pars_name(reftype)
        with asdf.open(path) as af:
            af.validate()
            config._validate_asdf(
                af, "http://stsci.edu/schemas/stpipe/step_config_with_metadata-1.0.0")
            assert af.tree["meta"]["reftype"] == reftype
        cfg = config_parser.load_config_file(str(path))
        assert cfg["class"].endswith(cls)
    jump = config_parser.load_config_file(
        str(crds_cache.root / "references/jwst/nircam" / refs.pars_name("pars-jumpstep")))
    assert float(jump["rejection_threshold"]) == 4.0


# --------------------------------------------------------------------------------------
# CRDS cache
# --------------------------------------------------------------------------------------


def test_mapping_checksum_matches_crds_rule():
    text = "header = {\n    'sha1sum' : 'x',\n    'name' : 'a.rmap',\n}\n"
    import hashlib
    assert cc.mapping_checksum(text) == hashlib.sha1(
        b"header = {\n    'name' : 'a.rmap',\n}\n").hexdigest()


def test_cache_layout_and_server_config(crds_cache):
    import ast
    root = crds_cache.root
    for instr in cc.INSTRUMENT_DIRS:
        assert (root / "references/jwst" / instr).is_dir()
    cfg = ast.literal_eval((root / "config/jwst/server_config").read_text())
    assert cfg["operational_context"] == cfg["latest_context"] == "jwst_0002.pmap"
    assert cfg["observatory"] == "jwst" and cfg["mappings"] == ["jwst_0001.pmap", "jwst_0002.pmap"]
    names = sorted(p.name for p in (root / "mappings/jwst").iterdir())
    assert "jwst_nircam_gain_0002.rmap" in names and "jwst_nircam_mask_0002.rmap" not in names


GAIN_OLD = {"NRCA1": "jwst_nircam_gain_0301.fits", "NRCB1": "jwst_nircam_gain_0306.fits"}


def _params(detector, date, subarray="SUB160"):
    return {"META.INSTRUMENT.NAME": "NIRCAM", "META.INSTRUMENT.DETECTOR": detector,
            "META.SUBARRAY.NAME": subarray, "META.OBSERVATION.DATE": date,
            "META.OBSERVATION.TIME": "12:00:00", "META.VISIT.TSOVISIT": False,
            "META.EXPOSURE.TYPE": "NRC_IMAGE"}


@pytest.mark.parametrize("context", ["jwst_0001.pmap", "jwst_0002.pmap"])
@pytest.mark.parametrize("detector", ["NRCA1", "NRCB1"])
@pytest.mark.parametrize("date", ["2023-06-01", "2024-06-01"])
def test_real_crds_selects_expected_files(crds_cache, context, detector, date):
    crds = pytest.importorskip("crds")
    types = ["mask", "saturation", "superbias", "linearity", "dark", "gain", "readnoise",
             "ipc", "refpix", "sirskernel", "pars-detector1pipeline", "pars-jumpstep"]
    got = crds.getreferences(_params(detector, date), reftypes=types, context=context,
                             observatory="jwst")
    serial = det.DETECTORS.index(detector) + 301
    for reftype in ("mask", "saturation", "superbias", "linearity", "dark", "readnoise"):
        assert Path(got[reftype]).name == f"jwst_nircam_{reftype}_{serial:04d}.fits"
        assert Path(got[reftype]).is_file()
    changed = context == "jwst_0002.pmap" and detector == "NRCA1" and date >= "2024"
    expect_gain = "jwst_nircam_gain_5301.fits" if changed else GAIN_OLD[detector]
    assert Path(got["gain"]).name == expect_gain
    assert got["ipc"] == got["refpix"] == got["sirskernel"] == "NOT FOUND n/a"
    assert Path(got["pars-jumpstep"]).name == "jwst_nircam_pars-jumpstep_0001.asdf"
    assert Path(got["pars-detector1pipeline"]).suffix == ".asdf"
    sub640 = crds.getrecommendations(_params(detector, date, "SUB640"), reftypes=["dark"],
                                     context=context, observatory="jwst", fast=True)
    assert sub640["dark"] == f"jwst_nircam_dark_{serial - 200:04d}.fits"


def test_crds_diff_sees_only_the_gain_change(crds_cache):
    crds_diff = pytest.importorskip("crds.diff")
    assert crds_diff.get_affected("jwst_0001.pmap", "jwst_0002.pmap") == {"nircam": ["gain"]}
    from crds.core import rmap
    for ctx in crds_cache.contexts:                      # full load with checksum checks
        pmap = rmap.load_mapping(ctx)
        assert not pmap.missing_mappings()


def test_write_contexts_declarative_extension(tmp_path):
    """Stage-2 style: add a reftype with its own parkeys through rule rows."""
    crds = pytest.importorskip("crds")
    specs = {("nircam", "flat"): cc.RefTypeSpec(
        ("META.INSTRUMENT.DETECTOR", "META.INSTRUMENT.FILTER", "META.INSTRUMENT.PUPIL"))}
    rows = [cc.RuleRow("flat", ("NRCA1", "F200W", "CLEAR"), "2022-01-01 00:00:00",
                       "jwst_nircam_flat_0001.fits"),
            cc.RuleRow("flat", ("NRCA1", "F150W|F090W", "CLEAR"), "2022-01-01 00:00:00",
                       "jwst_nircam_flat_0002.fits")]
    rows2 = rows + [cc.RuleRow("flat", ("NRCA1", "F200W", "CLEAR"), "2024-01-01 00:00:00",
                               "jwst_nircam_flat_0003.fits")]
    cc.ensure_layout(tmp_path)
    for i in (1, 2, 3):
        (tmp_path / f"references/jwst/nircam/jwst_nircam_flat_000{i}.fits").write_bytes(b"")
    names = cc.write_contexts(tmp_path, [rows, rows, rows2], specs=specs,
                              na_types={"nircam": ("ipc",)})
    assert names == ["jwst_0001.pmap", "jwst_0002.pmap", "jwst_0003.pmap"]
    maps = sorted(p.name for p in (tmp_path / "mappings/jwst").iterdir())
    assert maps.count("jwst_nircam_flat_0001.rmap") == 1 and "jwst_nircam_flat_0003.rmap" not in maps
    assert "jwst_nircam_flat_0002.rmap" in maps and "jwst_nircam_0003.imap" not in maps
    cc.write_server_config(tmp_path, names)
    old = os.environ.get("CRDS_PATH")
    os.environ["CRDS_PATH"] = str(tmp_path)
    cc.clear_crds_caches()
    try:
        params = {"META.INSTRUMENT.NAME": "NIRCAM", "META.INSTRUMENT.DETECTOR": "NRCA1",
                  "META.INSTRUMENT.FILTER": "F090W", "META.INSTRUMENT.PUPIL": "CLEAR",
                  "META.OBSERVATION.DATE": "2024-05-01", "META.OBSERVATION.TIME": "00:00:00"}
        rec = lambda ctx, p: crds.getrecommendations(p, reftypes=["flat", "ipc"], context=ctx,  # noqa: E731
                                                     observatory="jwst", fast=True)
        assert rec("jwst_0003.pmap", params) == {"flat": "jwst_nircam_flat_0002.fits",
                                                 "ipc": "NOT FOUND n/a"}
        params["META.INSTRUMENT.FILTER"] = "F200W"
        assert rec("jwst_0001.pmap", params)["flat"] == "jwst_nircam_flat_0001.fits"
        assert rec("jwst_0003.pmap", params)["flat"] == "jwst_nircam_flat_0003.fits"
    finally:
        if old is not None:
            os.environ["CRDS_PATH"] = old
        cc.clear_crds_caches()


def test_build_is_idempotent_and_extends(crds_cache, tmp_path):
    again = cc.build_crds_cache(crds_cache.root, detectors=("NRCA1",), subarrays=("SUB160",))
    assert again.written == []
    assert set(again.spec.subarrays) == {"SUB160", "SUB640"}        # union kept
    # a longer dark rewrites only that dark, under the same name
    root = tmp_path / "cache"
    first = cc.build_crds_cache(root, detectors=("NRCB1",), subarrays=("SUB64P",))
    assert len(first.written) == 6 + 1 + 3            # static types, dark, pars
    more = cc.build_crds_cache(root, detectors=("NRCB1",), subarrays=("SUB64P",),
                               dark_frames={"SUB64P": 25})
    assert more.written == [refs.reference_name("dark", "NRCB1", "SUB64P")]
    assert fits.getheader(root / "references/jwst/nircam" / more.written[0])["NGROUPS"] == 25
    assert cc.build_crds_cache(root, detectors=("NRCB1",), subarrays=("SUB64P",)).written == []
    manifest = root / cc.MANIFEST                     # a cache built with the earlier stage-2 recipes
    manifest.write_text(manifest.read_text().replace(f'"stage2_recipe": {cc.STAGE2_RECIPE}', '"stage2_recipe": 1'))
    redo = cc.build_crds_cache(root, detectors=("NRCB1",), subarrays=("SUB64P",))
    assert redo.stage2_written and any("_flat_" in name for name in redo.stage2_written)
    assert cc.build_crds_cache(root, detectors=("NRCB1",), subarrays=("SUB64P",)).stage2_written == []
    with pytest.raises(ValueError):
        cc.build_crds_cache(root, detectors=("NRCB1",), subarrays=("SUB64P",), seed=1)
    os.environ["CRDS_PATH"] = str(crds_cache.root)      # back to the session cache
    cc.clear_crds_caches()


# --------------------------------------------------------------------------------------
# Exposures
# --------------------------------------------------------------------------------------

PRIMARY_KEYS = (
    "TELESCOP INSTRUME DETECTOR MODULE CHANNEL FILTER PUPIL EXP_TYPE READPATT NINTS NGROUPS "
    "NFRAMES GROUPGAP FRMDIVSR NSAMPLES TSAMPLE TFRAME TGROUP EFFINTTM EFFEXPTM DURATION "
    "DATE-OBS TIME-OBS DATE-BEG EXPSTART EXPMID EXPEND SUBARRAY SUBSTRT1 SUBSTRT2 SUBSIZE1 "
    "SUBSIZE2 FASTAXIS SLOWAXIS NOUTPUTS ZEROFRAM DRPFRMS1 DRPFRMS3 PROGRAM OBSERVTN VISIT "
    "VISITGRP SEQ_ID ACT_ID EXPOSURE EXSEGNUM EXSEGTOT INTSTART INTEND TARGNAME TSOVISIT "
    "DATAMODL").split()
SCI_KEYS = "BUNIT RA_REF DEC_REF ROLL_REF V2_REF V3_REF V3I_YANG VPARITY RA_V1 DEC_V1 PA_V3".split()


def test_sub160_uncal_layout(sub160_observation, sub160_uncal):
    assert sub160_uncal.name == "jw01234001001_02101_00001_nrca1_uncal.fits"
    with fits.open(sub160_uncal, do_not_scale_image_data=True) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "SCI", "GROUP", "INT_TIMES", "ASDF"]
        prim, sci = hdul[0].header, hdul["SCI"].header
        for key in PRIMARY_KEYS:
            assert key in prim, key
        for key in SCI_KEYS:
            assert key in sci, key
        assert (sci["BITPIX"], sci["BZERO"]) == (16, 32768)
        assert hdul["SCI"].data.shape == (1, 10, 160, 160)
        assert len(hdul["GROUP"].data) == 10 and len(hdul["INT_TIMES"].data) == 1
        assert prim["TGROUP"] == pytest.approx(0.27864, abs=1e-6)
        assert (prim["SUBSTRT1"], prim["FASTAXIS"], prim["EXP_TYPE"]) == (1889, -1, "NRC_IMAGE")
    truth = json.loads((sub160_observation.out_dir / "synth_truth.json").read_text())
    assert truth["exposures"][0]["subarray"] == "SUB160"


def test_sub160_opens_as_rampmodel(sub160_uncal):
    datamodels = pytest.importorskip("stdatamodels.jwst.datamodels")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with datamodels.RampModel(str(sub160_uncal)) as model:
            model.validate()
            assert model.data.shape == (1, 10, 160, 160) and model.data.dtype == np.float32
            assert model.meta.exposure.readpatt == "RAPID"
            assert model.meta.subarray.name == "SUB160"
            assert model.meta.visit.tsovisit is False
            assert model.meta.wcsinfo.roll_ref is not None
            assert model.meta.exposure.frame_time == pytest.approx(0.27864, abs=1e-6)


def test_ramps_are_physical(sub160_observation, sub160_uncal):
    truth = sub160_observation.exposures[0]
    data = fits.getdata(sub160_uncal, "SCI").astype(np.float64)[0]
    maps = det.pixel_maps("NRCA1", 0, 1888, 1888, 160, 160)
    light = ~maps.is_ref & (maps.mask_dq == 0)
    # sky pixels ramp up at ~ QE*sky/gain DN/s (after removing the common reference drift)
    ramp = data[-1] - data[0]
    slope = np.median(ramp[light] - ramp[maps.is_ref].mean()) / (9 * truth.tframe)
    assert slope == pytest.approx(truth.sky_rate_dn, rel=0.5)
    # reference pixels do not ramp
    ref_trend = np.mean(data[-1][maps.is_ref] - data[0][maps.is_ref])
    assert abs(ref_trend) < 5
    # the saturating star reaches the saturation threshold
    star = [s for s in truth.sources if s["id"] in truth.saturated_sources][0]
    iy, ix = int(round(star["y"])), int(round(star["x"]))
    assert data[-1, iy, ix] >= maps.sat_thresh[iy, ix]
    assert data.max() <= 65535 and data.min() >= 0
    # bias level = superbias (+ kTC) in the first group of reference pixels
    assert np.median((data[0] - maps.superbias)[maps.is_ref]) == pytest.approx(0, abs=5)


def _emulated_rate(path, cfg):
    """A minimal stage-1 (superbias, refpix, linearity, dark, OLS) on our own ramps."""
    inp, _ = ex.prepare_inputs(cfg)
    maps = inp.maps
    data = fits.getdata(path, "SCI").astype(np.float64)[0] - maps.superbias
    _, parity = det.readout_columns(inp.info, inp.sub)
    for g in range(data.shape[0]):
        for p in (0, 1):
            cols = parity == p
            data[g][:, cols] -= data[g][:, cols][maps.is_ref[:, cols]].mean()
    c = maps.coeffs.astype(np.float64)
    lin = np.where(np.isfinite(c[0]), c[0] + data * (c[1] + data * (c[2] + data * (
        c[3] + data * c[4]))), data)
    tf = det.frame_time(inp.sub)
    lin -= refs.dark_cube(maps.dark_rate, tf, data.shape[0])
    t = (np.arange(data.shape[0]) + 1) * tf - (data.shape[0] + 1) / 2 * tf
    slope = np.tensordot(t, lin - lin.mean(0), axes=1) / np.sum(t ** 2)
    expected = inp.photo_rate / inp.true_gain
    good = ~maps.is_ref & (maps.mask_dq & dqflags.DO_NOT_USE == 0) & (maps.lin_dq == 0)
    return slope, expected, good


def test_calibrated_slopes_recover_truth(tmp_path):
    """Generator self-consistency: references of the same seed undo the detector."""
    cfg = ex.ExposureConfig(detector="NRCB1", subarray="SUB320", seed=3, sky=10.0,
                            noise=ex.NoiseParams(cr_rate=0.0))
    truth = ex.generate_exposure(cfg, tmp_path)
    slope, expected, good = _emulated_rate(truth.paths[0], cfg)
    faint = good & (expected < 50)
    resid = (slope - expected)[faint]
    assert abs(np.median(resid)) < 0.1
    # noise: read noise + Poisson, about as expected for 10 RAPID groups
    n, tf = 10, truth.tframe
    rn = np.median(det.pixel_maps("NRCB1", 3, 0, 0, 320, 320).readnoise) / np.sqrt(2)
    sigma = np.sqrt(12 * rn ** 2 / (tf ** 2 * (n ** 3 - n))
                    + 6 * (n * n + 1) / (5 * n * (n * n - 1)) * truth.sky_rate_dn / (2.05 * tf))
    robust = 1.4826 * np.median(np.abs(resid - np.median(resid)))
    assert robust == pytest.approx(sigma, rel=0.25)
    bright = good & (expected > 200) & (expected < 2000)
    assert np.median(slope[bright] / expected[bright]) == pytest.approx(1.0, abs=0.01)


def test_segments_split_integrations_and_match_unsegmented(tmp_path):
    base = ex.ExposureConfig(detector="NRCA1", subarray="SUB64P", readpatt="BRIGHT2",
                             ngroups=4, nints=3, seed=2, exposure=3)
    whole = ex.generate_exposure(base, tmp_path / "whole")
    split = ex.generate_exposure(replace(base, nsegments=2), tmp_path / "split")
    names = [p.name for p in split.paths]
    assert names == ["jw01234001001_02101_00003-seg001_nrca1_uncal.fits",
                     "jw01234001001_02101_00003-seg002_nrca1_uncal.fits"]
    full = fits.getdata(whole.paths[0], "SCI")
    parts = []
    for k, path in enumerate(split.paths, start=1):
        hdr = fits.getheader(path)
        assert (hdr["EXSEGNUM"], hdr["EXSEGTOT"], hdr["NINTS"]) == (k, 2, 3)
        parts.append(fits.getdata(path, "SCI"))
        assert parts[-1].shape[0] == hdr["INTEND"] - hdr["INTSTART"] + 1
        assert len(fits.getdata(path, "GROUP")) == 4 * parts[-1].shape[0]
        assert len(fits.getdata(path, "INT_TIMES")) == 3
    assert [fits.getheader(p)["INTSTART"] for p in split.paths] == [1, 3]
    np.testing.assert_array_equal(np.concatenate(parts), full)
    assert whole.paths[0].name == "jw01234001001_02101_00003_nrca1_uncal.fits"
    hdr = fits.getheader(whole.paths[0])
    assert (hdr["NFRAMES"], hdr["GROUPGAP"], hdr["FRMDIVSR"]) == (2, 0, 2)
    assert hdr["TGROUP"] == pytest.approx(2 * det.frame_time(det.subarray_for("NRCA1", "SUB64P")))


def test_zeroframe_and_plain_writer(tmp_path):
    cfg = ex.ExposureConfig(detector="NRCB1", subarray="SUB64P", ngroups=3, nints=2,
                            zeroframe=True)
    truth = ex.generate_exposure(cfg, tmp_path)
    with fits.open(truth.paths[0]) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "SCI", "ZEROFRAME", "GROUP", "INT_TIMES"]
        assert hdul["ZEROFRAME"].data.shape == (2, 64, 64)
        assert hdul[0].header["ZEROFRAM"] is True
        # RAPID: the zero frame is the first group
        np.testing.assert_array_equal(hdul["ZEROFRAME"].data, hdul["SCI"].data[:, 0])


def test_generate_observation_dithers_and_darks(crds_cache, tmp_path):
    from calstream.steps.synth import generate_observation
    info = generate_observation(tmp_path / "obs", crds_cache.root, detectors=("NRCB1",),
                                subarray="SUB160", readpatt="SHALLOW4", ngroups=3,
                                n_exposures=2, via_datamodels=False)
    assert [p.name for p in info.uncal_paths] == [
        "jw01234001001_02101_00001_nrcb1_uncal.fits", "jw01234001001_02101_00002_nrcb1_uncal.fits"]
    h1, h2 = (fits.getheader(p) for p in info.uncal_paths)
    assert h2["EXPSTART"] > h1["EXPEND"]
    s1, s2 = (fits.getheader(p, "SCI") for p in info.uncal_paths)
    assert (s1["RA_REF"], s1["DEC_REF"]) != (s2["RA_REF"], s2["DEC_REF"])
    x1 = {s["id"]: s["x"] for s in info.exposures[0].sources}
    x2 = {s["id"]: s["x"] for s in info.exposures[1].sources}
    common = set(x1) & set(x2)
    assert common and all(x2[i] - x1[i] == pytest.approx(13.4) for i in common)
    dark = crds_cache.root / "references/jwst/nircam" / refs.reference_name("dark", "NRCB1", "SUB160")
    assert fits.getheader(dark)["NGROUPS"] >= det.read_pattern("SHALLOW4").total_frames(3)
    assert info.crds_env()["CRDS_CONTEXT"] == "jwst_0002.pmap"


# --------------------------------------------------------------------------------------
# Parity: jwst 3.0.0 Detector1Pipeline on the synthetic data, offline
# --------------------------------------------------------------------------------------


def _run_detector1(uncal: Path, out_dir: Path, context: str):
    pipeline = pytest.importorskip("jwst.pipeline")
    previous = os.environ.get("CRDS_CONTEXT")
    os.environ["CRDS_CONTEXT"] = context
    cc.clear_crds_caches()
    try:
        pipeline.Detector1Pipeline.call(str(uncal), save_results=True, output_dir=str(out_dir))
    finally:
        if previous is None:
            os.environ.pop("CRDS_CONTEXT", None)
        else:
            os.environ["CRDS_CONTEXT"] = previous
        cc.clear_crds_caches()
    stem = uncal.name.replace("_uncal.fits", "")
    return out_dir / f"{stem}_rate.fits", out_dir / f"{stem}_rateints.fits"


def _check_rate(rate_path, cfg, tolerance):
    inp, _ = ex.prepare_inputs(cfg)
    expected = inp.photo_rate / inp.true_gain
    with fits.open(rate_path) as hdul:
        sci, err, dq = hdul["SCI"].data, hdul["ERR"].data, hdul["DQ"].data
        hdr = hdul[0].header
    good = ((dq & dqflags.DO_NOT_USE) == 0) & np.isfinite(sci) & ~inp.maps.is_ref
    resid = (sci - expected)[good]
    assert abs(np.median(resid)) < tolerance
    assert np.median(sci[good]) == pytest.approx(np.median(expected[good]), abs=tolerance)
    pull = 1.4826 * np.median(np.abs(resid / err[good]))
    assert 0.8 < pull < 1.25                              # jwst's errors fit our noise
    assert np.isnan(sci[(inp.maps.mask_dq & dqflags.DO_NOT_USE) > 0]).all()
    return hdr


@pytest.mark.parity
def test_jwst_detector1_sub160_offline(sub160_observation, sub160_uncal, tmp_path):
    rate, rateints = _run_detector1(sub160_uncal, tmp_path, "jwst_0002.pmap")
    cfg = ex.ExposureConfig(detector="NRCA1", subarray="SUB160")
    hdr = _check_rate(rate, cfg, tolerance=0.5)
    assert hdr["CRDS_CTX"] == "jwst_0002.pmap"
    assert hdr["R_GAIN"] == "crds://jwst_nircam_gain_5301.fits"       # after the change
    assert hdr["R_MASK"] == "crds://jwst_nircam_mask_0301.fits"
    for key in ("S_DQINIT", "S_SATURA", "S_SUPERB", "S_REFPIX", "S_LINEAR", "S_DARK",
                "S_JUMP", "S_RAMP"):
        assert hdr[key] == "COMPLETE", key
    assert hdr["S_IPC"] == "SKIPPED"
    assert fits.getdata(rateints, "SCI").shape == (1, 160, 160)


@pytest.mark.parity
def test_jwst_detector1_sub640_three_integrations(crds_cache, tmp_path):
    from calstream.steps.synth import generate_observation
    info = generate_observation(tmp_path / "obs", crds_cache.root, detectors=("NRCB1",),
                                subarray="SUB640", nints=3, seed=0)
    rate, rateints = _run_detector1(info.uncal_paths[0], tmp_path, "jwst_0001.pmap")
    cfg = ex.ExposureConfig(detector="NRCB1", subarray="SUB640", nints=3)
    hdr = _check_rate(rate, cfg, tolerance=0.1)
    assert hdr["CRDS_CTX"] == "jwst_0001.pmap"
    assert hdr["R_GAIN"] == "crds://jwst_nircam_gain_0106.fits"
    assert fits.getdata(rateints, "SCI").shape == (3, 640, 640)
    # cosmic rays were flagged where they hit
    crs = info.exposures[0].cosmic_rays
    big = crs[(crs["charge"] > 3000) & (crs["frame"] > 0)]   # frame-0 hits are invisible
    dq = fits.getdata(rateints, "DQ")
    hit = dq[big["integration"] - 1, big["y"], big["x"]]
    assert np.mean((hit & (dqflags.JUMP_DET | dqflags.SATURATED | dqflags.DO_NOT_USE)) > 0) > 0.9


def test_observation_filters_are_checked_up_front(tmp_path):
    from calstream.steps.synth import generate_observation
    from calstream.steps.synth.stage2 import check_filter

    assert check_filter("NRCA1", "f150w") == "F150W" and check_filter("NRCALONG", "F444W") == "F444W"
    with pytest.raises(ValueError, match="F444W is not in the SHORT channel of NRCA1"):
        generate_observation(tmp_path / "o", tmp_path / "crds", detectors=("NRCA1",), filter="F444W")
    with pytest.raises(ValueError, match="'F150W2' is not one the synthetic references know"):
        check_filter("NRCA1", "F150W2")
    assert not (tmp_path / "crds").exists()                 # refused before anything was written
