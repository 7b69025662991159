"""Tests of the detector1 correction kernels (steps/corrections.py)."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

from calstream.steps import corrections as C
from calstream.steps import dqflags as F

DNU, SAT, ADF, CHLO = F.DO_NOT_USE, F.SATURATED, F.PIXEL["AD_FLOOR"], F.CHARGELOSS


def same(a, b):
    """Bit-identical (NaN == NaN)."""
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


# --------------------------------------------------------------------------------- group_scale
def test_group_scale_applies_ratio():
    d = np.full((1, 2, 2, 2), 10.0, np.float32)
    assert C.group_scale(d, 4, 5)
    assert np.all(d == np.float32(10.0) * np.float32(0.8))


@pytest.mark.parametrize("frmdivsr,nframes", [(4, 4), (None, 5), (4, None)])
def test_group_scale_skips(frmdivsr, nframes):
    d = np.full((1, 1, 2, 2), 10.0, np.float32)
    assert not C.group_scale(d, frmdivsr, nframes)
    assert np.all(d == 10.0)


# --------------------------------------------------------------------------------- dq_init
def test_dq_init_or_and_dnu_to_groups():
    pdq = np.array([[2, 0], [0, 0]], np.uint32)
    gdq = np.zeros((2, 3, 2, 2), np.uint8)
    mask = np.array([[1, 2048], [1 | 8, 0]], np.uint32)
    C.dq_init(pdq, gdq, mask)
    assert pdq.tolist() == [[3, 2048], [9, 0]]
    assert np.all(gdq[:, :, 0, 0] == 1) and np.all(gdq[:, :, 1, 0] == 1)
    assert np.all(gdq[:, :, 0, 1] == 0) and np.all(gdq[:, :, 1, 1] == 0)


# --------------------------------------------------------------------------------- saturation
def _sat_inputs(ngroups=4, ny=5, nx=5):
    data = np.full((1, ngroups, ny, nx), 100.0, np.float32)
    thr = np.full((ny, nx), 1000.0, np.float32)
    return data, np.zeros(data.shape, np.uint8), np.zeros((ny, nx), np.uint32), thr, np.zeros((ny, nx), np.uint32)


def test_saturation_flags_later_groups_and_grows():
    data, gdq, pdq, thr, sdq = _sat_inputs()
    data[0, 2:, 2, 2] = 1500.0
    C.saturation(data, gdq, pdq, thr, sdq, nframes=1)
    assert np.all(gdq[0, :2] == 0)
    for g in (2, 3):
        plane = gdq[0, g]
        assert np.all(plane[1:4, 1:4] == SAT)  # pixel and its 8 neighbours
        assert plane.sum() == 9 * SAT


def test_saturation_no_grow_and_ad_floor():
    data, gdq, pdq, thr, sdq = _sat_inputs()
    data[0, 3, 0, 0] = 2000.0
    data[0, 1, 4, 4] = 0.0
    C.saturation(data, gdq, pdq, thr, sdq, nframes=1, n_pix_grow_sat=0)
    assert gdq[0, 3, 0, 0] == SAT and gdq[0, 3].sum() == SAT
    assert gdq[0, 1, 4, 4] == ADF | DNU
    assert gdq[0, 2, 4, 4] == 0  # A/D floor only in that group


def test_saturation_no_sat_check_and_nan_threshold():
    data, gdq, pdq, thr, sdq = _sat_inputs()
    data[0, :, 1, 1] = 5000.0
    data[0, :, 3, 3] = 5000.0
    sdq[1, 1] = F.NO_SAT_CHECK
    thr[3, 3] = np.nan
    C.saturation(data, gdq, pdq, thr, sdq, nframes=1, n_pix_grow_sat=0)
    assert not gdq.any()
    assert pdq[1, 1] == F.NO_SAT_CHECK and pdq[3, 3] == F.NO_SAT_CHECK
    assert np.isnan(thr[3, 3])  # the caller's reference array is not modified


def test_saturation_diluted_group_before_saturation():
    # nframes=4: group 0 averages frames 1-4, dilution factor 2.5/4; the value 700 >= 1000*0.625
    data, gdq, pdq, thr, sdq = _sat_inputs(ngroups=2)
    data[0, 0, 2, 2] = 700.0
    data[0, 1, 2, 2] = 1200.0
    C.saturation(data, gdq, pdq, thr, sdq, nframes=4, n_pix_grow_sat=0)
    assert gdq[0, 0, 2, 2] == DNU and gdq[0, 1, 2, 2] == SAT
    gdq[:] = 0
    C.saturation(data, gdq, pdq, thr, sdq, nframes=4, n_pix_grow_sat=0, use_readpatt=False)
    assert gdq[0, 0, 2, 2] == 0


def test_saturation_group2_rule():
    # group 1 far below, big jump into group 2 (not saturated), group 3 saturated
    data, gdq, pdq, thr, sdq = _sat_inputs(ngroups=3)
    data[0, :, 2, 2] = [100.0, 600.0, 1200.0]
    C.saturation(data, gdq, pdq, thr, sdq, nframes=1, n_pix_grow_sat=0)
    # (600-100) > (1000-100)/1 is false with nframes=1 ...
    assert gdq[0, 1, 2, 2] == 0
    gdq[:] = 0
    data[0, :, 2, 2] = [100.0, 400.0, 1200.0]
    C.saturation(data, gdq, pdq, thr, sdq, nframes=4, n_pix_grow_sat=0)
    # ... but with 4 frames per group: 300 > 900/4 and 100/2.5*12 < 1000 -> DO_NOT_USE in group 2
    assert gdq[0, 1, 2, 2] == DNU and gdq[0, 2, 2, 2] == SAT


def test_saturation_zeroframe():
    data, gdq, pdq, thr, sdq = _sat_inputs(ngroups=2)
    z = np.full((1, 5, 5), 50.0, np.float32)
    z[0, 0, 0] = 5000.0
    z[0, 4, 4] = -1.0
    C.saturation(data, gdq, pdq, thr, sdq, nframes=1, zframe=z)
    assert np.all(z[0, :2, :2] == 0) and z[0, 4, 4] == 0 and z[0, 2, 2] == 50.0


def _random_ramp(rng, nints=2, ngroups=6, ny=40, nx=50, nframes=4):
    thr = rng.uniform(20000, 40000, (ny, nx)).astype(np.float32)
    thr[rng.random((ny, nx)) < 0.03] = np.nan
    sdq = np.zeros((ny, nx), np.uint32)
    sdq[rng.random((ny, nx)) < 0.03] = F.NO_SAT_CHECK
    sdq[rng.random((ny, nx)) < 0.03] |= F.HOT
    rate = rng.exponential(3000, (ny, nx)).astype(np.float32)
    bias = rng.normal(10000, 100, (ny, nx)).astype(np.float32)
    bias[rng.random((ny, nx)) < 0.02] = np.nan
    scale = rng.uniform(0.5, 1.5, (nints, 1, 1, 1))
    data = np.nan_to_num(bias) + rate * np.arange(1, ngroups + 1)[None, :, None, None] * scale
    data = (data + rng.normal(0, 20, data.shape)).astype(np.float32)
    jump = rng.random((nints, 1, ny, nx)) < 0.05
    data[:, 1:] += np.where(jump, np.float32(30000), np.float32(0))
    data[rng.random(data.shape) < 0.01] = 0
    gdq = np.zeros(data.shape, np.uint8)
    gdq[rng.random(data.shape) < 0.02] = DNU
    return data, gdq, np.zeros((ny, nx), np.uint32), thr, sdq, bias


def test_saturation_chunks_equal_whole():
    rng = np.random.default_rng(1)
    data, gdq, pdq, thr, sdq, bias = _random_ramp(rng, ny=60)
    kw = dict(nframes=4, n_pix_grow_sat=1)
    g_whole = gdq.copy()
    C.saturation(data.copy(), g_whole, pdq.copy(), thr, sdq, bias, **kw)
    halo = C.saturation_halo(1)
    assert halo == 2
    g_chunks = gdq.copy()
    for r0 in range(0, 60, 16):
        a, b = max(r0 - halo, 0), min(r0 + 16 + halo, 60)
        g = gdq[:, :, a:b].copy()
        C.saturation(data[:, :, a:b].copy(), g, pdq[a:b].copy(), thr[a:b], sdq[a:b], bias[a:b], **kw)
        g_chunks[:, :, r0:r0 + 16] = g[:, :, r0 - a:r0 - a + 16]
    assert np.array_equal(g_chunks, g_whole)
    assert (g_whole & SAT).any() and (g_whole & ADF).any()


@pytest.mark.parity
@pytest.mark.parametrize("nframes,grow,readpatt,with_bias,ngroups",
                         [(4, 1, True, True, 6), (1, 1, True, True, 6), (4, 2, True, False, 5),
                          (4, 1, False, True, 6), (5, 1, True, True, 3), (4, 1, True, True, 2)])
def test_saturation_parity(nframes, grow, readpatt, with_bias, ngroups):
    sat = pytest.importorskip("stcal.saturation.saturation")
    from stdatamodels.jwst.datamodels import dqflags as jdq

    rng = np.random.default_rng(nframes * 10 + grow + ngroups)
    data, gdq, pdq, thr, sdq, bias = _random_ramp(rng, ngroups=ngroups, nframes=nframes)
    bias = bias if with_bias else None
    z = (data[:, 0] * 0.5).astype(np.float32)
    g1, p1, z1 = gdq.copy(), pdq.copy(), z.copy()
    C.saturation(data.copy(), g1, p1, thr, sdq, bias, nframes=nframes, n_pix_grow_sat=grow,
                 use_readpatt=readpatt, zframe=z1)
    rp = C.read_pattern(ngroups, nframes) if readpatt else None
    g2, p2, z2 = sat.flag_saturated_pixels(
        data.copy(), gdq.copy(), pdq.copy(), thr.copy(), sdq.copy(), C.ATOD_LIMIT, jdq.pixel,
        n_pix_grow_sat=grow, read_pattern=rp, zframe=z.copy(),
        bias=None if bias is None else bias.copy())
    assert np.array_equal(g1, g2) and np.array_equal(p1, p2) and same(z1, z2)


# --------------------------------------------------------------------------------- ipc
def test_ipc_identity_and_known_values():
    d = np.arange(1 * 1 * 6 * 6, dtype=np.float32).reshape(1, 1, 6, 6)
    k = np.zeros((3, 3), np.float32)
    k[1, 1] = 1.0
    e = d.copy()
    C.ipc(e, k)
    assert np.array_equal(e, d)
    k = np.zeros((3, 3), np.float32)
    k[1, 1], k[0, 1] = 1.0, 0.5  # out[y, x] = d[y, x] + 0.5 * d[y + 1, x]
    e = d.copy()
    C.ipc(e, k, (1, 1, 1, 1))
    assert np.array_equal(e[0, 0, 0], d[0, 0, 0]) and np.array_equal(e[0, 0, :, 5], d[0, 0, :, 5])
    assert e[0, 0, 2, 3] == d[0, 0, 2, 3] + 0.5 * d[0, 0, 3, 3]
    assert e[0, 0, 4, 3] == d[0, 0, 4, 3]  # neighbour below is a reference row: counts as 0


def test_ipc_nref():
    assert C.ipc_nref(1, 1, 2048, 2048) == (4, 4, 4, 4)
    assert C.ipc_nref(1, 1, 64, 64) == (4, 0, 4, 0)
    assert C.ipc_nref(1985, 1985, 64, 64) == (0, 4, 0, 4)
    assert C.ipc_nref(100, 100, 64, 64) == (0, 0, 0, 0)


@pytest.mark.parametrize("kdim", [2, 4])
def test_ipc_chunks_equal_whole(kdim):
    rng = np.random.default_rng(2)
    data = rng.normal(1000, 300, (2, 2, 40, 30)).astype(np.float32)
    k = rng.normal(0, 0.01, (5, 5)).astype(np.float32)
    k[2, 2] = 1.02
    if kdim == 4:
        k = (k[:, :, None, None] + rng.normal(0, 1e-3, (5, 5, 40, 30))).astype(np.float32)
    nref = (4, 0, 4, 0)
    whole = data.copy()
    C.ipc(whole, k, nref)
    out = data.copy()
    h = C.ipc_halo(k)
    for r0 in range(0, 40, 7):
        a, b = max(r0 - h, 0), min(r0 + 7 + h, 40)
        ch = data[:, :, a:b].copy()
        C.ipc(ch, k if kdim == 2 else k[:, :, a:b], nref, row_start=a, frame_ny=40)
        out[:, :, r0:r0 + 7] = ch[:, :, r0 - a:r0 - a + 7]
    assert np.array_equal(out, whole) and not np.array_equal(whole, data)


@pytest.mark.parity
@pytest.mark.parametrize("kdim,ksize,nref", [(2, 3, (4, 0, 4, 0)), (2, 5, (4, 4, 4, 4)),
                                             (4, 3, (0, 3, 2, 0)), (4, 5, (0, 0, 0, 0))])
def test_ipc_parity(kdim, ksize, nref):
    ipc_corr = pytest.importorskip("jwst.ipc.ipc_corr")
    rng = np.random.default_rng(ksize + kdim)
    data = rng.normal(1000, 300, (2, 2, 30, 34)).astype(np.float32)
    k = rng.normal(0, 0.01, (ksize, ksize)).astype(np.float32)
    k[ksize // 2, ksize // 2] = 1.02
    if kdim == 4:
        k = (k[:, :, None, None] + rng.normal(0, 1e-3, (ksize, ksize, 30, 34))).astype(np.float32)
    ours = data.copy()
    C.ipc(ours, k, nref)
    theirs = data.copy()
    for i in range(2):
        for g in range(2):
            ipc_corr.ipc_convolve(theirs[i, g], k, ipc_corr.NumRefPixels(*nref))
    assert np.array_equal(ours, theirs)


# --------------------------------------------------------------------------------- superbias
def test_superbias():
    d = np.full((2, 2, 2, 2), 100.0, np.float32)
    bias = np.array([[10.0, np.nan], [0.5, -3.0]], np.float32)
    bdq = np.array([[0, F.UNRELIABLE_BIAS], [0, 0]], np.uint32)
    pdq = np.zeros((2, 2), np.uint32)
    z = np.array([[[0.0, 50.0], [50.0, 50.0]]] * 2, np.float32)
    C.superbias(d, pdq, bias, bdq, zframe=z)
    assert np.all(d[..., 0, 0] == 90.0) and np.all(d[..., 0, 1] == 100.0)
    assert np.all(d[..., 1, 0] == 99.5) and np.all(d[..., 1, 1] == 103.0)
    assert pdq[0, 1] == F.UNRELIABLE_BIAS
    assert np.all(z[:, 0, 0] == 0.0) and np.all(z[:, 1, 1] == 53.0)


@pytest.mark.parity
def test_superbias_parity():
    pytest.importorskip("jwst")
    from jwst.superbias import bias_sub
    from stdatamodels.jwst.datamodels import RampModel, SuperBiasModel

    rng = np.random.default_rng(4)
    d = rng.normal(12000, 500, (2, 3, 20, 24)).astype(np.float32)
    bias = rng.normal(11000, 400, (20, 24)).astype(np.float32)
    bias[rng.random(bias.shape) < 0.05] = np.nan
    bdq = (rng.random((20, 24)) < 0.1).astype(np.uint32) * F.UNRELIABLE_BIAS
    z = d[:, 0].copy()
    z[:, ::5, ::3] = 0
    ours, pdq, zo = d.copy(), np.zeros((20, 24), np.uint32), z.copy()
    C.superbias(ours, pdq, bias, bdq, zframe=zo)
    m = RampModel(data=d.copy(), pixeldq=np.zeros((20, 24), np.uint32), zeroframe=z.copy())
    m.meta.exposure.zero_frame = True
    bm = SuperBiasModel(data=bias.copy(), dq=bdq.copy())
    bm.data[np.isnan(bm.data)] = 0.0
    bias_sub.subtract_bias(m, bm)
    assert same(ours, m.data) and np.array_equal(pdq, m.pixeldq) and same(zo, m.zeroframe)


# --------------------------------------------------------------------------------- linearity
def test_linearity_known_polynomial():
    d = np.array([[[[1000.0, 2000.0], [3000.0, 4000.0]]] * 3], np.float32)  # (1, 3, 2, 2)
    gdq = np.zeros(d.shape, np.uint8)
    gdq[0, 2, 0, 0] = SAT
    c = np.zeros((3, 2, 2), np.float32)
    c[0], c[1], c[2] = 1.0, 1.0, 1e-5
    c[2, 0, 1] = np.nan  # -> identity + NO_LIN_CORR
    c[1, 1, 0] = 0.0  # zero linear term -> identity + NO_LIN_CORR
    ldq = np.array([[0, 0], [0, F.NO_LIN_CORR]], np.uint32)  # flagged -> identity
    pdq = np.zeros((2, 2), np.uint32)
    C.linearity(d, gdq, pdq, c, ldq)
    expect = np.float32(1.0) + np.float32(1000.0) * (np.float32(1.0) + np.float32(1e-5) * np.float32(1000.0))
    assert d[0, 0, 0, 0] == expect and d[0, 1, 0, 0] == expect
    assert d[0, 2, 0, 0] == 1000.0  # saturated group untouched
    assert np.all(d[0, :, 0, 1] == 2000.0) and np.all(d[0, :, 1, 0] == 3000.0)
    assert np.all(d[0, :, 1, 1] == 4000.0)
    assert pdq.tolist() == [[0, F.NO_LIN_CORR], [F.NO_LIN_CORR, F.NO_LIN_CORR]]


def _lin_inputs(rng, nc, inverse, nints=2, ng=7, ny=30, nx=40):
    data = np.sort(rng.uniform(-100, 50000, (nints, ng, ny, nx)).astype(np.float32), axis=1)
    gdq = np.zeros(data.shape, np.uint8)
    gdq[data > 40000] = SAT
    gdq[rng.random(data.shape) < 0.02] |= DNU
    c = np.zeros((nc, ny, nx), np.float32)
    c[0] = rng.normal(0, 1, (ny, nx))
    c[1] = rng.normal(1, 0.01, (ny, nx))
    for k in range(2, nc):
        c[k] = rng.normal(0, 1e-6 ** (k - 1), (ny, nx))
    c[nc - 1, 3, 4] = np.nan
    c[1, 5, 6] = 0
    ldq = np.zeros((ny, nx), np.uint32)
    ldq[7, 8] = F.NO_LIN_CORR
    ldq[9, 9] = F.HOT
    ic = None
    if inverse:
        ic = np.zeros_like(c)
        ic[0] = rng.normal(0, 1, (ny, nx))
        ic[1] = np.float32(1.0) / np.where(c[1] == 0, 1, c[1])
        for k in range(2, nc):
            ic[k] = -0.9 * c[k]
        ic[1, 10, 10] = 0
    return data, gdq, c, ldq, ic


@pytest.mark.parity
@pytest.mark.parametrize("nc,inverse", [(2, False), (5, False), (3, True), (5, True)])
def test_linearity_parity(nc, inverse):
    lin = pytest.importorskip("stcal.linearity.linearity")
    from stdatamodels.jwst.datamodels import dqflags as jdq

    rng = np.random.default_rng(nc + 10 * inverse)
    data, gdq, c, ldq, ic = _lin_inputs(rng, nc, inverse)
    pdq = np.zeros(ldq.shape, np.uint32)
    z = data[:, 0].copy()
    z[0, 1, 1] = 0
    d1, p1, z1 = data.copy(), pdq.copy(), z.copy()
    C.linearity(d1, gdq, p1, c, ldq, inv_coeffs=ic, nframes=4, zframe=z1)
    rp = C.read_pattern(data.shape[1], 4) if inverse else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d2, p2, z2 = lin.linearity_correction(
            data.copy(), gdq.copy(), pdq.copy(), c.copy(), ldq.copy(), jdq.pixel,
            zframe=z.copy(), ilin_coeffs=None if ic is None else ic.copy(), read_pattern=rp)
    assert same(d1, d2) and np.array_equal(p1, p2) and same(z1, z2)
    assert (d1 != data).mean() > 0.5


# --------------------------------------------------------------------------------- dark
def _dark_planes(n, ny=2, nx=3):
    return np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None], (n, ny, nx)).copy()


def test_dark_direct_and_average():
    d = np.zeros((1, 3, 2, 3), np.float32)
    pdq = np.zeros((2, 3), np.uint32)
    ddq = np.full((2, 3), F.UNRELIABLE_DARK, np.uint32)
    assert C.dark_current(d, pdq, _dark_planes(5), ddq, nframes=1, groupgap=0, dark_nframes=1,
                          dark_groupgap=0) == "COMPLETE"
    assert d[0, :, 0, 0].tolist() == [0.0, -1.0, -2.0] and np.all(pdq == F.UNRELIABLE_DARK)
    d[:] = 0
    # nframes=2, groupgap=1: group g averages planes 3g and 3g+1 -> 3g + 0.5
    C.dark_current(d, pdq, _dark_planes(9), ddq, nframes=2, groupgap=1, dark_nframes=1,
                   dark_groupgap=0)
    assert d[0, :, 1, 2].tolist() == [-0.5, -3.5, -6.5]


def test_dark_nan_and_extrapolation():
    d = np.zeros((1, 4, 2, 3), np.float32)
    dark = _dark_planes(3) * 2  # planes 0, 2, 4; needs 4 -> extrapolated plane 6
    dark[1, 0, 0] = np.nan
    C.dark_current(d, np.zeros((2, 3), np.uint32), dark, np.zeros((2, 3), np.uint32), nframes=1,
                   groupgap=0, dark_nframes=1, dark_groupgap=0)
    assert d[0, :, 1, 1].tolist() == [0.0, -2.0, -4.0, -6.0]
    assert d[0, 1, 0, 0] == 0.0  # NaN dark counts as 0
    with pytest.raises(C.DarkError, match="exposure needs 4 frames"):
        C.dark_current(d, np.zeros((2, 3), np.uint32), dark, np.zeros((2, 3), np.uint32),
                       nframes=1, groupgap=0, dark_nframes=1, dark_groupgap=0,
                       allow_extrapolation=False)


def test_dark_skipped_when_dark_pattern_is_coarser():
    d = np.ones((1, 2, 2, 3), np.float32)
    pdq = np.zeros((2, 3), np.uint32)
    st = C.dark_current(d, pdq, _dark_planes(5), np.ones((2, 3), np.uint32), nframes=1,
                        groupgap=0, dark_nframes=2, dark_groupgap=0)
    assert st == "SKIPPED" and np.all(d == 1) and not pdq.any()


def test_dark_frames_plan():
    assert C.dark_frames_plan(10, 4, 1, 200, 1, 0) == ("average", 0)
    assert C.dark_frames_plan(10, 1, 0, 10, 1, 0) == ("direct", 0)
    assert C.dark_frames_plan(10, 1, 0, 8, 1, 0) == ("direct", 2)
    assert C.dark_frames_plan(5, 2, 0, 10, 4, 0)[0] == "skip"


@pytest.mark.parity
@pytest.mark.parametrize("sci,drk", [((5, 1, 0), (10, 1, 0)), ((5, 4, 1), (30, 1, 0)),
                                     ((5, 4, 1), (10, 1, 0)), ((5, 1, 0), (3, 1, 0)),
                                     ((5, 4, 1), (3, 4, 1)), ((6, 3, 2), (4, 2, 1)),
                                     ((5, 2, 2), (5, 4, 0))])
def test_dark_parity(sci, drk):
    pytest.importorskip("stcal")
    from stcal.dark_current import dark_class, dark_sub

    (ng, nf, gg), (nd, dnf, dgg) = sci, drk
    rng = np.random.default_rng(ng + nd + dnf)
    data = rng.normal(1000, 50, (2, ng, 12, 14)).astype(np.float32)
    dark = (rng.normal(5, 3, (nd, 12, 14)) * np.arange(1, nd + 1)[:, None, None]).astype(np.float32)
    dark[rng.random(dark.shape) < 0.02] = np.nan
    ddq = (rng.random((12, 14)) < 0.1).astype(np.uint32) * F.UNRELIABLE_DARK
    d1, p1 = data.copy(), np.zeros((12, 14), np.uint32)
    st = C.dark_current(d1, p1, dark, ddq, nframes=nf, groupgap=gg, dark_nframes=dnf,
                        dark_groupgap=dgg)
    sd = dark_class.ScienceData()
    sd.data, sd.groupdq, sd.pixeldq = data.copy(), np.zeros(data.shape, np.uint8), np.zeros((12, 14), np.uint32)
    sd.exp_nframes, sd.exp_groupgap, sd.exp_intstart = nf, gg, 1
    dd = dark_class.DarkData()
    dd.data, dd.groupdq = dark.copy(), ddq.copy()
    dd.exp_nframes, dd.exp_ngroups, dd.exp_groupgap = dnf, nd, dgg
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, _ = dark_sub.do_correction_data(sd, dd)
    finally:
        logging.disable(logging.NOTSET)
    assert st == out.cal_step
    assert same(d1, out.data) and np.array_equal(p1, out.pixeldq)


# --------------------------------------------------------------------------------- charge_migration
def test_charge_migration_known():
    d = np.full((1, 4, 4, 4), 100.0, np.float32)
    gdq = np.zeros(d.shape, np.uint8)
    d[0, 2:, 1, 1] = 30000.0
    d[0, 1:, 3, 3] = 30000.0
    gdq[0, 1, 3, 3] = DNU  # exactly DO_NOT_USE: ignored in that group, group 2 triggers
    assert C.charge_migration(d, gdq, 25000.0)
    f = CHLO | DNU
    for y, x in [(1, 1), (0, 1), (2, 1), (1, 0), (1, 2)]:
        assert gdq[0, :2, y, x].tolist() in ([0, 0],) and np.all(gdq[0, 2:, y, x] == f)
    assert gdq[0, 2, 0, 0] == 0  # diagonal neighbour untouched
    assert gdq[0, 1, 3, 3] == DNU and np.all(gdq[0, 2:, 3, 3] == f)
    assert not C.charge_migration(d[:, :2], gdq[:, :2].copy(), 25000.0)


def test_charge_migration_chunks_equal_whole():
    rng = np.random.default_rng(5)
    d = np.sort(rng.uniform(0, 30000, (2, 5, 30, 20)).astype(np.float32), axis=1)
    gdq = np.zeros(d.shape, np.uint8)
    gdq[rng.random(d.shape) < 0.1] = DNU
    whole = gdq.copy()
    C.charge_migration(d, whole)
    out = gdq.copy()
    h = C.charge_migration_halo()
    for r0 in range(0, 30, 8):
        a, b = max(r0 - h, 0), min(r0 + 8 + h, 30)
        g = gdq[:, :, a:b].copy()
        C.charge_migration(d[:, :, a:b], g)
        out[:, :, r0:r0 + 8] = g[:, :, r0 - a:r0 - a + 8]
    assert np.array_equal(out, whole)


@pytest.mark.parity
def test_charge_migration_parity():
    pytest.importorskip("jwst")
    from jwst.charge_migration import charge_migration as jcm
    from stdatamodels.jwst.datamodels import RampModel

    rng = np.random.default_rng(6)
    d = np.sort(rng.uniform(0, 30000, (2, 6, 20, 25)).astype(np.float32), axis=1)
    gdq = np.zeros(d.shape, np.uint8)
    gdq[rng.random(d.shape) < 0.1] = DNU
    gdq[rng.random(d.shape) < 0.05] |= SAT
    m = RampModel(data=d.copy(), groupdq=gdq.copy())
    jcm.charge_migration(m, 25000.0)
    ours = gdq.copy()
    C.charge_migration(d, ours, 25000.0)
    assert np.array_equal(ours, m.groupdq) and (ours & CHLO).any()


# --------------------------------------------------------------------------------- gain_scale
def test_gain_scale():
    sci, err = np.full((2, 2), 2.0, np.float32), np.full((2, 2), 1.0, np.float32)
    vp, vr = np.full((2, 2), 4.0, np.float32), np.full((2, 2), 9.0, np.float32)
    C.gain_scale(sci, err, vp, vr, 1.5)
    assert np.all(sci == 3.0) and np.all(err == 1.5)
    assert np.all(vp == 9.0) and np.all(vr == np.float32(9.0) * np.float32(2.25))
    C.gain_scale(sci, err, None, None, 2.0)
    assert np.all(sci == 6.0)


@pytest.mark.parity
def test_gain_scale_parity():
    pytest.importorskip("jwst")
    from jwst.gain_scale import gain_scale as jgs
    from stdatamodels.jwst.datamodels import ImageModel

    rng = np.random.default_rng(7)
    arrs = [rng.normal(10, 3, (8, 9)).astype(np.float32) for _ in range(4)]
    m = ImageModel(data=arrs[0].copy(), err=arrs[1].copy(), var_poisson=arrs[2].copy(),
                   var_rnoise=arrs[3].copy())
    jgs.do_correction(m, 1.37)
    ours = [a.copy() for a in arrs]
    C.gain_scale(*ours, 1.37)
    assert all(np.array_equal(a, b) for a, b in
               zip(ours, [m.data, m.err, m.var_poisson, m.var_rnoise]))


@pytest.mark.parity
def test_group_scale_and_dq_init_parity():
    pytest.importorskip("jwst")
    from jwst.dq_init import dq_initialization
    from jwst.group_scale import group_scale as jgs
    from stdatamodels.jwst.datamodels import MaskModel, RampModel

    rng = np.random.default_rng(8)
    d = rng.normal(1000, 100, (2, 3, 10, 12)).astype(np.float32)
    m = RampModel(data=d.copy())
    m.meta.exposure.nframes, m.meta.exposure.frame_divisor = 5, 4
    jgs.do_correction(m)
    ours = d.copy()
    assert C.group_scale(ours, 4, 5)
    assert np.array_equal(ours, m.data)

    mask = (rng.integers(0, 4, (10, 12)) * rng.integers(0, 2, (10, 12))).astype(np.uint32)
    m = RampModel(data=d.copy(), pixeldq=np.zeros((10, 12), np.uint32),
                  groupdq=np.zeros(d.shape, np.uint8))
    m.meta.exposure.type = "NRC_IMAGE"
    m.meta.subarray.xstart, m.meta.subarray.ystart = 1, 1
    m.meta.subarray.xsize, m.meta.subarray.ysize = 12, 10
    mm = MaskModel(dq=mask.copy())
    mm.meta.subarray.xstart, mm.meta.subarray.ystart = 1, 1
    mm.meta.subarray.xsize, mm.meta.subarray.ysize = 12, 10
    dq_initialization.do_dqinit(m, mm)
    pdq, gdq = np.zeros((10, 12), np.uint32), np.zeros(d.shape, np.uint8)
    C.dq_init(pdq, gdq, mask)
    assert np.array_equal(pdq, m.pixeldq) and np.array_equal(gdq, m.groupdq)
