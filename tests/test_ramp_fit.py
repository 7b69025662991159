"""Tests of the ramp_fit kernel (OLS with optimal weighting, stcal's OLS_C)."""

from __future__ import annotations

import numpy as np
import pytest

from calstream.steps import dqflags as F
from calstream.steps import ramp_fit as rf

DNU, SAT, JUMP = F.DO_NOT_USE, F.SATURATED, F.JUMP_DET
GAIN, RN = 2.0, 10.0  # e-/DN, DN


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _pixel(ramps, flags=None, *, pdq=0, gain=GAIN, rn=RN, nframes=1, groupgap=0,
           frame_time=10.0, **kw):
    """Fit one pixel: ramps (nints, ngroups) DN, flags the same shape (group DQ)."""
    data = np.asarray(ramps, np.float32)[:, :, None, None]
    gdq = np.zeros(data.shape, np.uint8) if flags is None else np.asarray(flags, np.uint8)[:, :, None, None]
    group_time = frame_time * (nframes + groupgap)
    params = kw.pop("params", rf.RampFitParameters())
    return rf.fit_ramps(data, gdq, np.full((1, 1), pdq, np.uint32), np.full((1, 1), rn, np.float32),
                        np.full((1, 1), gain, np.float32), frame_time, group_time, nframes, groupgap,
                        0, params, **kw)


def _rn_scaled(rn=RN, gain=GAIN, nframes=1):
    """The read noise as stcal uses it: float32(rn * gain / sqrt(2 nframes))."""
    scale = np.float64(np.float32(gain)) / np.sqrt(2.0 * nframes)
    return float(np.float32(np.float64(np.float32(rn)) * scale))


def _var_r(length, group_time=10.0, gain=GAIN, rn=RN, nframes=1):
    """Read-noise variance of one segment ((DN/s)^2)."""
    rns = _rn_scaled(rn, gain, nframes) / group_time
    if length <= 2:
        return 12.0 * rns * rns / (6.0 * gain * gain)
    return 12.0 * rns * rns / ((length ** 3 - length) * gain * gain)


def _var_p(rate, length, group_time=10.0, gain=GAIN):
    """Poisson variance of one segment, from the (median) rate in DN/s."""
    return rate / (group_time * gain * max(length - 1, 1))


def _line(n, slope_per_group=5.0, offset=100.0):
    return offset + slope_per_group * np.arange(n)


def _value(res, name):
    return float(getattr(res, name).ravel()[0])


# --------------------------------------------------------------------------------------------
# known answers
# --------------------------------------------------------------------------------------------

def test_noiseless_linear_ramp_exact_slope_and_variances():
    res = _pixel([_line(10)])
    assert _value(res, "rate") == pytest.approx(0.5, rel=1e-6)
    assert _value(res, "ints_rate") == pytest.approx(0.5, rel=1e-6)
    vr, vp = _var_r(10), _var_p(0.5, 10)
    assert _value(res, "rate_var_rnoise") == pytest.approx(vr, rel=1e-6)
    assert _value(res, "rate_var_poisson") == pytest.approx(vp, rel=1e-6)
    assert _value(res, "rate_err") == pytest.approx(np.sqrt(vr + vp), rel=1e-6)
    assert _value(res, "ints_err") == pytest.approx(np.sqrt(vr + vp), rel=1e-6)
    assert res.rate_dq[0, 0] == 0 and res.ints_dq[0, 0, 0] == 0


@pytest.mark.parametrize("signal", [5.0, 80.0, 4000.0])  # S/N classes: power 0, 3-6, 10
def test_linear_ramp_exact_for_every_weighting_power(signal):
    res = _pixel([_line(12, signal)])
    assert _value(res, "rate") == pytest.approx(signal / 10.0, rel=1e-6)


def test_jump_splits_ramp_into_two_segments_with_equal_slopes():
    ramp = _line(10)
    ramp[5:] += 300.0
    flags = np.zeros((1, 10), np.uint8)
    flags[0, 5] = JUMP
    res = _pixel([ramp], flags)
    assert _value(res, "rate") == pytest.approx(0.5, rel=1e-6)
    # segments [0, 5) and [5, 10): the jump group starts the second one
    assert _value(res, "rate_var_rnoise") == pytest.approx(_var_r(5) / 2, rel=1e-6)
    assert _value(res, "rate_var_poisson") == pytest.approx(_var_p(0.5, 5) / 2, rel=1e-6)
    assert res.rate_dq[0, 0] == JUMP and res.ints_dq[0, 0, 0] == JUMP


def test_do_not_use_group_splits_without_jump_start():
    flags = np.zeros((1, 10), np.uint8)
    flags[0, 3] = DNU
    res = _pixel([_line(10)], flags)
    assert _value(res, "rate") == pytest.approx(0.5, rel=1e-6)
    # segments [0, 3) and [4, 10)
    expected = 1.0 / (1.0 / _var_r(3) + 1.0 / _var_r(6))
    assert _value(res, "rate_var_rnoise") == pytest.approx(expected, rel=1e-6)
    assert res.rate_dq[0, 0] == 0


def test_saturation_from_group_k_uses_the_groups_before():
    ramp = _line(10)
    ramp[6:] = 65000.0
    flags = np.zeros((1, 10), np.uint8)
    flags[0, 6:] = SAT
    res = _pixel([ramp], flags)
    assert _value(res, "rate") == pytest.approx(0.5, rel=1e-6)
    assert _value(res, "rate_var_rnoise") == pytest.approx(_var_r(6), rel=1e-6)
    assert res.rate_dq[0, 0] == SAT and res.ints_dq[0, 0, 0] == SAT


def test_one_good_group_suppressed_by_default():
    flags = np.zeros((1, 10), np.uint8)
    flags[0, 1:] = SAT
    res = _pixel([_line(10)], flags)
    assert np.isnan(_value(res, "rate")) and np.isnan(_value(res, "ints_rate"))
    assert res.rate_dq[0, 0] == DNU | SAT and res.ints_dq[0, 0, 0] == DNU | SAT
    for name in ("rate_var_poisson", "rate_var_rnoise", "rate_err", "ints_err"):
        assert _value(res, name) == 0.0


def test_one_good_group_unsuppressed_uses_zeroth_group_time():
    # frame-averaged groups (nframes=2, groupgap=1): the group's mean time is 1.5 frames
    flags = np.zeros((1, 6), np.uint8)
    flags[0, 1:] = SAT
    res = _pixel([[300.0, 0, 0, 0, 0, 0]], flags, nframes=2, groupgap=1,
                 params=rf.RampFitParameters(suppress_one_group=False))
    assert _value(res, "rate") == pytest.approx(300.0 / 15.0, rel=1e-6)
    assert res.rate_dq[0, 0] == SAT


def test_first_group_saturated_is_unusable():
    flags = np.full((1, 10), SAT, np.uint8)
    res = _pixel([_line(10)], flags)
    assert np.isnan(_value(res, "rate"))
    assert res.rate_dq[0, 0] == DNU | SAT and res.ints_dq[0, 0, 0] == DNU | SAT
    assert _value(res, "rate_err") == 0.0 and _value(res, "rate_var_rnoise") == 0.0


def test_all_groups_do_not_use():
    res = _pixel([_line(5)], np.full((1, 5), DNU, np.uint8))
    assert np.isnan(_value(res, "rate"))
    assert res.rate_dq[0, 0] == DNU


def test_two_group_ramp():
    res = _pixel([[100.0, 107.0]])
    assert _value(res, "rate") == pytest.approx(0.7, rel=1e-6)
    assert _value(res, "rate_var_rnoise") == pytest.approx(_var_r(2), rel=1e-6)
    assert _value(res, "rate_var_poisson") == pytest.approx(_var_p(0.7, 2), rel=1e-6)


@pytest.mark.parametrize("pdq, gain, expected_extra", [
    (DNU | F.DEAD, GAIN, 0),
    (0, 0.0, DNU | F.NO_GAIN_VALUE),
    (0, np.nan, DNU | F.NO_GAIN_VALUE),
])
def test_unusable_pixels_are_nan_with_zero_variances(pdq, gain, expected_extra):
    res = _pixel([_line(10), _line(10)], pdq=pdq, gain=gain)
    assert np.isnan(_value(res, "rate")) and np.all(np.isnan(res.ints_rate))
    assert res.rate_dq[0, 0] == pdq | expected_extra
    assert np.all(res.ints_dq == pdq | expected_extra)
    assert _value(res, "rate_err") == 0.0 and _value(res, "rate_var_poisson") == 0.0


def test_integrations_combine_by_inverse_read_noise_variance():
    second = _line(10, 10.0)
    flags = np.zeros((2, 10), np.uint8)
    flags[1, 4:] = SAT
    res = _pixel([_line(10), second], flags)
    w1, w2 = 1.0 / _var_r(10), 1.0 / _var_r(4)
    assert res.ints_rate[:, 0, 0] == pytest.approx([0.5, 1.0], rel=1e-6)
    assert _value(res, "rate") == pytest.approx((0.5 * w1 + 1.0 * w2) / (w1 + w2), rel=1e-6)
    assert _value(res, "rate_var_rnoise") == pytest.approx(1.0 / (w1 + w2), rel=1e-6)
    assert res.rate_dq[0, 0] == SAT and list(res.ints_dq[:, 0, 0]) == [0, SAT]


def test_firstgroup_lastgroup_restrict_the_fit():
    ramp = _line(10)
    ramp[:2] = 0.0     # garbage outside [2, 7]
    ramp[8:] = 1e4
    res = _pixel([ramp], params=rf.RampFitParameters(firstgroup=2, lastgroup=7))
    assert _value(res, "rate") == pytest.approx(0.5, rel=1e-6)
    assert _value(res, "rate_var_rnoise") == pytest.approx(_var_r(6), rel=1e-6)


def test_zeroframe_used_only_without_one_group_suppression():
    flags = np.full((1, 4), SAT, np.uint8)
    zf = np.full((1, 1, 1), 50.0, np.float32)
    off = _pixel([_line(4)], flags, zeroframe=zf, params=rf.RampFitParameters(suppress_one_group=False))
    assert _value(off, "rate") == pytest.approx(50.0 / 10.0, rel=1e-6)  # ZEROFRAME / frame time
    assert off.rate_dq[0, 0] == SAT
    on = _pixel([_line(4)], flags, zeroframe=zf)
    assert np.isnan(_value(on, "rate"))


def test_dark_current_adds_to_poisson_variance():
    res = _pixel([_line(10)], dark_current=0.25)
    assert _value(res, "rate_var_poisson") == pytest.approx(_var_p(0.75, 10), rel=1e-6)


def test_chunked_calls_match_one_call_and_inputs_untouched():
    rng = np.random.default_rng(5)
    nints, ngroups, ny, nx = 2, 6, 17, 9
    data = np.cumsum(rng.normal(20, 5, (nints, ngroups, ny, nx)), axis=1).astype(np.float32)
    gdq = np.where(rng.random(data.shape) < 0.1, JUMP, 0).astype(np.uint8)
    gdq[:, 3:, ::4, ::3] |= SAT
    pdq = np.zeros((ny, nx), np.uint32)
    rn = np.full((ny, nx), RN, np.float32)
    gain = np.full((ny, nx), GAIN, np.float32)
    gdq_before = gdq.copy()
    gdq.setflags(write=False)
    params = rf.RampFitParameters()
    whole = rf.fit_ramps(data, gdq, pdq, rn, gain, 10.0, 10.0, 1, 0, 0, params)
    out = rf.RampFitResult.empty(nints, ny, nx)
    for r0 in range(0, ny, 5):
        sl = slice(r0, r0 + 5)
        rf.fit_ramps(data[:, :, sl], gdq[:, :, sl], pdq[sl], rn[sl], gain[sl], 10.0, 10.0, 1, 0, 0,
                     params, out, r0)
    for name in ("rate", "rate_dq", "rate_var_poisson", "rate_var_rnoise", "rate_err",
                 "ints_rate", "ints_dq", "ints_var_poisson", "ints_var_rnoise", "ints_err"):
        np.testing.assert_array_equal(getattr(out, name), getattr(whole, name), err_msg=name)
    np.testing.assert_array_equal(gdq, gdq_before)
    assert whole.rate.dtype == np.float32 and whole.rate_dq.dtype == np.uint32
    assert np.isfinite(whole.rate).mean() > 0.5


def test_chunk_must_fit_output():
    out = rf.RampFitResult.empty(1, 4, 3)
    data = np.zeros((1, 3, 2, 3), np.float32)
    with pytest.raises(ValueError):
        rf.fit_ramps(data, np.zeros(data.shape, np.uint8), np.zeros((2, 3), np.uint32),
                     np.ones((2, 3), np.float32), np.ones((2, 3), np.float32), 1.0, 1.0, 1, 0, 0,
                     rf.RampFitParameters(), out, 3)


_OUTPUTS = ("rate", "rate_dq", "rate_var_poisson", "rate_var_rnoise", "rate_err",
            "ints_rate", "ints_dq", "ints_var_poisson", "ints_var_rnoise", "ints_err")


def _bits(arr):
    """The array's bit patterns (so that NaN payloads and -0.0 count)."""
    return arr.view(np.uint32) if arr.dtype == np.float32 else arr


@pytest.mark.parametrize("nints, ngroups", [(1, 3), (1, 10), (1, 20), (3, 10), (2, 5)])
def test_vectorized_and_per_pixel_paths_agree_bitwise(nints, ngroups):
    # Unflagged ramps take the block-vectorized path; a PERSISTENCE flag, which changes nothing
    # in the fit, sends the same ramps through the per-pixel one (for nints > 1: only the
    # flagged integration). The numbers must agree bit for bit, the DQ differ by PERSISTENCE.
    rng = np.random.default_rng(ngroups * 10 + nints)
    ny, nx = 6, 150  # more than one block of pixels
    data, _, pdq, rn, gain, ft, gt = _make_ramps(rng, nints, ngroups, ny, nx)
    data = np.nan_to_num(data, nan=7.0)
    clean = np.zeros(data.shape, np.uint8)
    pers = clean.copy()
    pers[nints // 2, rng.integers(0, ngroups, (ny, nx)), np.arange(ny)[:, None], np.arange(nx)] = \
        F.PIXEL["PERSISTENCE"]
    pers[:, :, :, ::7] = 0  # some pixels stay on the vectorized path
    params = rf.RampFitParameters()
    a = rf.fit_ramps(data, clean, pdq, rn, gain, ft, gt, 1, 0, 0, params)
    b = rf.fit_ramps(data, pers, pdq, rn, gain, ft, gt, 1, 0, 0, params)
    for name in _OUTPUTS:
        if name.endswith("dq"):
            continue
        np.testing.assert_array_equal(_bits(getattr(a, name)), _bits(getattr(b, name)), err_msg=name)
    p = np.uint32(F.PIXEL["PERSISTENCE"])
    flagged = pers.any(axis=1)
    np.testing.assert_array_equal(b.ints_dq, a.ints_dq | np.where(flagged, p, 0))
    np.testing.assert_array_equal(b.rate_dq, a.rate_dq | np.where(flagged.any(axis=0), p, 0))
    assert np.isfinite(a.rate).mean() > 0.8


def _special_ramps(seed, nints, ngroups, ny=24, nx=40):
    """_make_ramps plus CHARGELOSS groups, a dark current and a ZEROFRAME."""
    rng = np.random.default_rng(seed)
    data, gdq, pdq, rn, gain, ft, gt = _make_ramps(rng, nints, ngroups, ny, nx)
    fq = gdq.reshape(nints, ngroups, -1)
    for _ in range(ny * nx // 10):
        i, p, g = rng.integers(nints), rng.integers(fq.shape[2]), rng.integers(ngroups)
        fq[i, g:, p] |= F.CHARGELOSS | (DNU if rng.random() < 0.8 else 0)
    dark = rng.uniform(0, 0.5, (ny, nx)).astype(np.float32)
    zf = (data[:, 0] * 0.5).astype(np.float32)
    return (data, gdq, pdq, rn, gain, ft, gt), dict(dark_current=dark, zeroframe=zf)


@pytest.mark.parametrize("suppress", [True, False])
def test_single_integration_rate_arrays_vs_rateints(suppress):
    # With one integration, SCI, DQ and VAR_POISSON equal the rateints ones bit for bit (what
    # share_single_integration relies on). ERR is another formula (sqrt(var_p + var_r) vs the
    # segments' combined total variance), and VAR_RNOISE differs where the CHARGELOSS pass
    # leaves the rate value but zeroes the integration's (both as in stcal).
    args, kw = _special_ramps(3, 1, 8)
    res = rf.fit_ramps(*args, 1, 0, 0, rf.RampFitParameters(suppress_one_group=suppress), **kw)
    for rate_name, ints_name in (("rate", "ints_rate"), ("rate_dq", "ints_dq"),
                                 ("rate_var_poisson", "ints_var_poisson")):
        np.testing.assert_array_equal(_bits(getattr(res, rate_name)),
                                      _bits(getattr(res, ints_name)[0]), err_msg=rate_name)
    assert not np.array_equal(res.rate_err, res.ints_err[0])
    if not suppress:
        assert not np.array_equal(res.rate_var_rnoise, res.ints_var_rnoise[0])


@pytest.mark.parametrize("nints", [1, 2])
def test_share_single_integration(nints):
    args, kw = _special_ramps(4, nints, 7)
    data, gdq, pdq, rn, gain = args[:5]
    ny, nx = pdq.shape
    params = rf.RampFitParameters()
    ref = rf.fit_ramps(*args, 1, 0, 0, params, **kw)
    shared = rf.RampFitResult.empty(nints, ny, nx, share_single_integration=True)
    assert shared.shares_single_integration == (nints == 1)
    assert not rf.RampFitResult.empty(nints, ny, nx).shares_single_integration
    for r0 in range(0, ny, 5):  # chunked, as the driver calls it
        sl = slice(r0, r0 + 5)
        rf.fit_ramps(data[:, :, sl], gdq[:, :, sl], pdq[sl], rn[sl], gain[sl], *args[5:], 1, 0, 0,
                     params, shared, r0, dark_current=kw["dark_current"][sl],
                     zeroframe=kw["zeroframe"][:, sl])
    for name in _OUTPUTS:
        np.testing.assert_array_equal(_bits(getattr(shared, name)), _bits(getattr(ref, name)),
                                      err_msg=name)
    if nints == 1:
        assert np.shares_memory(shared.rate_dq, shared.ints_dq)
        assert np.shares_memory(shared.rate_var_poisson, shared.ints_var_poisson)
        assert not np.shares_memory(shared.rate_err, shared.ints_err)
        assert not np.shares_memory(shared.rate_var_rnoise, shared.ints_var_rnoise)


def test_chunk_views_use_the_one_compiled_kernel():
    # the driver passes non-contiguous row views of a chunk buffer: no copy, no new signature
    rng = np.random.default_rng(8)
    data, gdq, pdq, rn, gain, ft, gt = _make_ramps(rng, 2, 5, 20, 30)
    buf = np.zeros((2, 5, 26, 30), np.float32)
    buf[:, :, 3:23] = data
    qbuf = np.zeros(buf.shape, np.uint8)
    qbuf[:, :, 3:23] = gdq
    view, qview = buf[:, :, 3:23], qbuf[:, :, 3:23]
    assert not view.flags.c_contiguous
    params = rf.RampFitParameters()
    out = rf.RampFitResult.empty(2, 40, 30)
    rf.fit_ramps(view, qview, pdq, rn, gain, ft, gt, 1, 0, 0, params, out, 10)
    ref = rf.fit_ramps(data, gdq, pdq, rn, gain, ft, gt, 1, 0, 0, params)
    for name in _OUTPUTS:
        np.testing.assert_array_equal(_bits(getattr(out, name)[..., 10:30, :]),
                                      _bits(getattr(ref, name)), err_msg=name)
    assert len(rf._compiled("fit_rows").signatures) == 1


def test_outputs_must_be_c_contiguous():
    data = np.zeros((1, 3, 2, 3), np.float32)
    out = rf.RampFitResult.empty(1, 2, 6)
    out = rf.RampFitResult(**{f: (getattr(out, f)[..., ::2] if f == "rate_err" else getattr(out, f)[..., :3])
                              for f in _OUTPUTS})
    with pytest.raises(ValueError, match="C-contiguous"):
        rf.fit_ramps(data, np.zeros(data.shape, np.uint8), np.zeros((2, 3), np.uint32),
                     np.ones((2, 3), np.float32), np.ones((2, 3), np.float32), 1.0, 1.0, 1, 0, 0,
                     rf.RampFitParameters(), out, 0)


def test_median_network_keeps_the_middle_values():
    assert len(rf._median_network(1)) == 0 and len(rf._median_network(rf._MAX_ROW_NETWORK + 1)) == 0
    for n in range(2, rf._MAX_ROW_NETWORK + 1):
        pairs = rf._median_network(n)
        rng = np.random.default_rng(n)
        vals = np.round(rng.normal(size=(n, 40)) * 3)
        work = vals.copy()
        for a, b in pairs:
            lo, hi = np.minimum(work[a], work[b]), np.maximum(work[a], work[b])
            work[a], work[b] = lo, hi
        srt = np.sort(vals, axis=0)
        m = n >> 1
        np.testing.assert_array_equal(work[m], srt[m])
        if n % 2 == 0:
            np.testing.assert_array_equal(work[m - 1], srt[m - 1])
        assert 0 < len(pairs) <= len(rf._sorting_network(n))


@pytest.mark.parametrize("n", list(range(0, 40)) + [100, 300])
def test_median_matches_numpy(n):
    rng = np.random.default_rng(n)
    for trial in range(5):
        vals = rng.normal(size=max(n, 16))
        if trial % 2:
            vals = np.round(vals * 2)  # ties
        expected = np.median(vals[:n]) if n else np.nan
        got = rf._median(vals.copy(), n)
        assert (np.isnan(got) and np.isnan(expected)) or got == expected


@pytest.mark.parametrize("n", list(range(1, 70)))
def test_row_sorting_network_sorts(n):
    pairs = rf._sorting_network(n)
    if n < 2 or n > rf._MAX_ROW_NETWORK:
        assert pairs.shape == (0, 2)
        return
    rng = np.random.default_rng(n)
    vals = np.round(rng.normal(size=(n, 50)) * 3)
    work = vals.copy()
    for a, b in pairs:
        lo, hi = np.minimum(work[a], work[b]), np.maximum(work[a], work[b])
        work[a], work[b] = lo, hi
    np.testing.assert_array_equal(work, np.sort(vals, axis=0))


# --------------------------------------------------------------------------------------------
# parameters and exposure-level decisions
# --------------------------------------------------------------------------------------------

def test_parameters_from_mapping():
    p = rf.RampFitParameters.from_mapping({"suppress_one_group": "False", "firstgroup": "2",
                                           "maximum_cores": 4, "skip": False, "output_dir": None})
    assert p.suppress_one_group is False and p.firstgroup == 2 and p.maximum_cores == "4"
    assert rf.RampFitParameters.from_mapping({}) == rf.RampFitParameters()
    with pytest.raises(NotImplementedError, match="LIKELY"):
        rf.RampFitParameters.from_mapping({"algorithm": "LIKELY"})
    with pytest.raises(NotImplementedError):
        rf.RampFitParameters.from_mapping({"save_opt": True})
    with pytest.raises(ValueError):
        rf.RampFitParameters.from_mapping({"bogus": 1})


@pytest.mark.parametrize("first, last, expected", [
    (None, None, []), (2, None, [0, 1]), (None, 6, [7, 8, 9]), (2, 6, [0, 1, 7, 8, 9]),
    (6, 2, []), (-3, 20, []), (12, 15, list(range(10))),
])
def test_first_last_group_mask(first, last, expected):
    mask = rf.first_last_group_mask(10, first, last)
    assert list(np.flatnonzero(mask)) == expected


def test_exposure_fit_plan_miri_trimming_and_all_saturated():
    gdq = np.zeros((2, 6, 3, 3), np.uint8)
    gdq[:, 0] = DNU
    gdq[:, -1] = DNU
    plan = rf.exposure_fit_plan(*rf.group_flag_all(gdq, rf.RampFitParameters()), "MIRI")
    assert plan == (1, 5)
    assert rf.exposure_fit_plan(*rf.group_flag_all(gdq, rf.RampFitParameters()), "NIRCAM") == (0, 6)
    gdq[:, :5] = DNU  # one group left
    assert rf.exposure_fit_plan(*rf.group_flag_all(gdq, rf.RampFitParameters()), "MIRI") is None
    sat = np.full((1, 3, 2, 2), SAT, np.uint8)
    assert rf.exposure_fit_plan(*rf.group_flag_all(sat, rf.RampFitParameters()), "NIRCAM") is None


def test_group_flag_all_accumulates_over_chunks():
    gdq = np.zeros((1, 4, 6, 2), np.uint8)
    gdq[:, 0] = DNU
    gdq[:, 1, :3] = DNU  # only the first chunk
    p = rf.RampFitParameters()
    a = rf.group_flag_all(gdq[:, :, :3], p)[0]
    b = rf.group_flag_all(gdq[:, :, 3:], p)[0]
    assert list(a & b) == [True, False, False, False]
    assert list(rf.group_flag_all(gdq, p)[0]) == list(a & b)


# --------------------------------------------------------------------------------------------
# parity with stcal / jwst
# --------------------------------------------------------------------------------------------

def _make_ramps(rng, nints, ngroups, ny, nx, nframes=1, groupgap=0, frame_time=10.737):
    """Realistic random ramps with jumps, saturation, DO_NOT_USE, one-good-group and
    all-saturated pixels, bad gains and pixel-DQ DO_NOT_USE."""
    gain = rng.normal(2.0, 0.1, (ny, nx)).astype(np.float32)
    rn = rng.normal(10.0, 1.0, (ny, nx)).astype(np.float32)
    rate = (10 ** rng.uniform(-1, 3, (ny, nx))).astype(np.float32)
    t = (np.arange(ngroups) * (nframes + groupgap) + (nframes + 1) / 2.0) * frame_time
    data = np.empty((nints, ngroups, ny, nx), np.float32)
    for i in range(nints):
        electrons = rng.poisson(rate * gain * t[:, None, None]).astype(np.float64)
        noise = rng.normal(0, 1, (ngroups, ny, nx)) * rn / np.sqrt(nframes)
        data[i] = (electrons / gain + noise).astype(np.float32)
    gdq = np.zeros(data.shape, np.uint8)
    n = ny * nx
    fd, fq = data.reshape(nints, ngroups, n), gdq.reshape(nints, ngroups, n)
    pick = lambda k: (rng.integers(0, nints, k), rng.integers(0, n, k))  # noqa: E731
    for i, p in zip(*pick(n // 5)):  # jumps
        g = rng.integers(1, ngroups) if ngroups > 1 else 0
        fd[i, g:, p] += rng.uniform(50, 2000)
        fq[i, g, p] |= JUMP
    for i, p in zip(*pick(n // 8)):  # saturation from group k (k = 0: all saturated)
        fq[i, rng.integers(0, ngroups):, p] |= SAT
    for i, p in zip(*pick(n // 30)):  # one good group
        fq[i, 1:, p] |= SAT
    for i, p in zip(*pick(n // 10)):
        fq[i, rng.integers(0, ngroups), p] |= DNU
    for i, p in zip(*pick(n // 40)):
        fq[i, rng.integers(0, ngroups), p] |= F.PIXEL["PERSISTENCE"]
    for i, p in zip(*pick(n // 40)):  # jump-only first group
        fq[i, 0, p] |= JUMP
    pdq = np.zeros(n, np.uint32)
    pdq[rng.integers(0, n, n // 50)] |= DNU | F.DEAD
    pdq[rng.integers(0, n, n // 50)] |= F.HOT
    gain.reshape(-1)[rng.integers(0, n, n // 100)] = np.nan
    k = max(n // 100, 1)  # NaN samples in unflagged groups
    fd[rng.integers(0, nints, k), rng.integers(0, ngroups, k), rng.integers(0, n, k)] = np.nan
    gain.reshape(-1)[rng.integers(0, n, n // 100)] = 0.0
    group_time = frame_time * (nframes + groupgap)
    return data, gdq, pdq.reshape(ny, nx), rn, gain, frame_time, group_time


def _stcal_fit(data, gdq, pdq, rn, gain, frame_time, group_time, nframes, groupgap, *,
               suppress=True, dark=None, zeroframe=None, instrument="NIRCAM", firstgroup=None,
               lastgroup=None):
    """stcal's OLS_C as jwst's RampFitStep drives it."""
    srf = pytest.importorskip("stcal.ramp_fitting.ramp_fit")
    ramp_fit_class = pytest.importorskip("stcal.ramp_fitting.ramp_fit_class")
    dqflags = pytest.importorskip("stdatamodels.jwst.datamodels").dqflags
    step = pytest.importorskip("jwst.ramp_fitting.ramp_fit_step")
    ny, nx = pdq.shape
    gdq = gdq.copy()
    if firstgroup is not None or lastgroup is not None:
        step.set_groupdq(firstgroup, lastgroup, data.shape[1], gdq, dqflags.group)
    orig = gdq.copy() if np.any(gdq & F.CHARGELOSS) else None
    dark = np.zeros((ny, nx), np.float32) if dark is None else np.asarray(dark, np.float32)
    rd = ramp_fit_class.RampData()
    rd.set_arrays(data.copy(), gdq, pdq.copy(), dark, orig_gdq=orig, zeroframe=zeroframe)
    rd.set_meta(name=instrument, frame_time=frame_time, group_time=group_time, groupgap=groupgap,
                nframes=nframes, drop_frames1=0)
    rd.algorithm = "OLS_C"
    rd.set_dqflags(dqflags.pixel)
    rd.start_row, rd.num_rows = 0, ny
    rd.suppress_one_group_ramps = bool(suppress and data.shape[1] > 1)
    return srf.ramp_fit_data(rd, False, rn.copy(), gain.copy(), "OLS_C", "optimal", "1")


# (our rate array, our rateints array, stcal's key)
_PAIRS = [("rate", "ints_rate", "slope"), ("rate_dq", "ints_dq", "dq"),
          ("rate_var_poisson", "ints_var_poisson", "var_poisson"),
          ("rate_var_rnoise", "ints_var_rnoise", "var_rnoise"), ("rate_err", "ints_err", "err")]


def _assert_parity(ours, image, integ):
    """DQ identical, NaN where stcal has NaN, values within 1e-5 relative (we are bit-exact
    on this machine; the tolerance leaves room for a different libm)."""
    for rate_name, ints_name, key in _PAIRS:
        for name, ref in ((rate_name, image), (ints_name, integ)):
            got, want = getattr(ours, name), ref[key]
            if key == "dq":
                np.testing.assert_array_equal(got, want, err_msg=name)
                continue
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=name)
            ok = ~np.isnan(want)
            np.testing.assert_allclose(got[ok], want[ok], rtol=1e-5, atol=0, err_msg=name)


@pytest.mark.parity
@pytest.mark.parametrize("nints, ngroups, nframes, groupgap", [
    (1, 10, 1, 0), (3, 10, 1, 0), (1, 2, 1, 0), (3, 3, 1, 0), (2, 10, 2, 1), (1, 1, 1, 0),
    (1, 20, 1, 0), (1, 70, 1, 0),  # long ramps: row network / per-pixel Shell sort medians
])
@pytest.mark.parametrize("suppress", [True, False])
def test_parity_with_stcal(nints, ngroups, nframes, groupgap, suppress):
    rng = np.random.default_rng(100 * nints + ngroups + 7 * nframes)
    data, gdq, pdq, rn, gain, ft, gt = _make_ramps(rng, nints, ngroups, 24, 24, nframes, groupgap)
    image, integ, _ = _stcal_fit(data, gdq, pdq, rn, gain, ft, gt, nframes, groupgap, suppress=suppress)
    ours = rf.fit_ramps(data, gdq, pdq, rn, gain, ft, gt, nframes, groupgap, 0,
                        rf.RampFitParameters(suppress_one_group=suppress))
    _assert_parity(ours, image, integ)
    assert 0.5 < np.isfinite(ours.rate).mean() < 1.0  # the special cases are present


@pytest.mark.parity
@pytest.mark.parametrize("suppress", [True, False])
def test_parity_dark_zeroframe_chargeloss(suppress):
    rng = np.random.default_rng(11)
    nints, ngroups = 3, 6
    data, gdq, pdq, rn, gain, ft, gt = _make_ramps(rng, nints, ngroups, 24, 24)
    fq = gdq.reshape(nints, ngroups, -1)
    for _ in range(100):
        i, p, g = rng.integers(nints), rng.integers(fq.shape[2]), rng.integers(ngroups)
        fq[i, g:, p] |= F.CHARGELOSS | (DNU if rng.random() < 0.8 else 0)
    dark = rng.uniform(0, 0.5, (24, 24)).astype(np.float32)
    zf = (data[:, 0] * 0.5).astype(np.float32)
    zf[:, ::5, ::3] = 0.0
    image, integ, _ = _stcal_fit(data, gdq, pdq, rn, gain, ft, gt, 1, 0, suppress=suppress,
                                 dark=dark, zeroframe=zf)
    ours = rf.fit_ramps(data, gdq, pdq, rn, gain, ft, gt, 1, 0, 0,
                        rf.RampFitParameters(suppress_one_group=suppress), dark_current=dark, zeroframe=zf)
    _assert_parity(ours, image, integ)
    if not suppress:  # the ZEROFRAME path was taken
        plain = rf.fit_ramps(data, gdq, pdq, rn, gain, ft, gt, 1, 0, 0,
                             rf.RampFitParameters(suppress_one_group=False), dark_current=dark)
        assert not np.array_equal(plain.rate, ours.rate, equal_nan=True)


@pytest.mark.parity
@pytest.mark.parametrize("first, last", [(1, None), (None, 4), (2, 4), (4, 2), (-1, 10)])
def test_parity_firstgroup_lastgroup(first, last):
    rng = np.random.default_rng(12)
    data, gdq, pdq, rn, gain, ft, gt = _make_ramps(rng, 2, 6, 16, 16)
    image, integ, _ = _stcal_fit(data, gdq, pdq, rn, gain, ft, gt, 1, 0, firstgroup=first, lastgroup=last)
    ours = rf.fit_ramps(data, gdq, pdq, rn, gain, ft, gt, 1, 0, 0,
                        rf.RampFitParameters(firstgroup=first, lastgroup=last))
    _assert_parity(ours, image, integ)


@pytest.mark.parity
@pytest.mark.parametrize("lead, trail", [(1, True), (2, False)])
def test_parity_miri_group_trimming(lead, trail):
    rng = np.random.default_rng(13)
    data, gdq, pdq, rn, gain, ft, gt = _make_ramps(rng, 2, 8, 16, 16, frame_time=2.775)
    gdq[:, :lead] |= DNU
    if trail:
        gdq[:, -1] |= DNU
    gdq[:, lead, ::3, ::2] |= JUMP  # stcal clears JUMP_DET on the new first group
    plan = rf.exposure_fit_plan(*rf.group_flag_all(gdq, rf.RampFitParameters()), "MIRI")
    assert plan == (lead, 8 - trail)
    image, integ, _ = _stcal_fit(data, gdq, pdq, rn, gain, ft, gt, 1, 0, instrument="MIRI")
    ours = rf.fit_ramps(data, gdq, pdq, rn, gain, ft, gt, 1, 0, 0, rf.RampFitParameters(),
                        group_range=plan)
    _assert_parity(ours, image, integ)


@pytest.mark.parity
def test_parity_no_products_when_stcal_returns_none():
    gdq = np.zeros((1, 3, 4, 4), np.uint8)
    gdq[:, 0] = DNU
    gdq[:, 2] = SAT  # with suppression every ramp loses its one good group
    data = np.zeros(gdq.shape, np.float32)
    ones = np.ones((4, 4), np.float32)
    image, _, _ = _stcal_fit(data, gdq, np.zeros((4, 4), np.uint32), ones, ones, 2.7, 2.7, 1, 0,
                             instrument="MIRI")
    assert image is None
    assert rf.exposure_fit_plan(*rf.group_flag_all(gdq, rf.RampFitParameters()), "MIRI") is None


@pytest.mark.parity
def test_first_last_group_mask_matches_jwst():
    step = pytest.importorskip("jwst.ramp_fitting.ramp_fit_step")
    dqflags = pytest.importorskip("stdatamodels.jwst.datamodels").dqflags
    for first in (None, -2, 0, 1, 3, 7, 9, 12):
        for last in (None, -1, 0, 2, 5, 9, 11):
            gdq = np.zeros((1, 10, 1, 1), np.uint8)
            step.set_groupdq(first, last, 10, gdq, dqflags.group)
            expected = (gdq[0, :, 0, 0] & DNU) != 0
            np.testing.assert_array_equal(rf.first_last_group_mask(10, first, last), expected,
                                          err_msg=f"{first}, {last}")


@pytest.mark.parity
def test_parameter_defaults_match_jwst():
    step = pytest.importorskip("jwst.ramp_fitting.ramp_fit_step")
    s = step.RampFitStep()
    p = rf.RampFitParameters()
    assert (p.algorithm, p.suppress_one_group, p.firstgroup, p.lastgroup, p.maximum_cores) == \
        (s.algorithm, s.suppress_one_group, s.firstgroup, s.lastgroup, s.maximum_cores)
    assert p.weighting == step.RampFitStep.weighting
