"""Tests of calstream.steps.jump: known answers, chunking, and parity with stcal / jwst."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from calstream.steps import dqflags
from calstream.steps.errors import ParameterError
from calstream.steps.jump import (
    IGNORED_JWST_KEYS,
    JumpParameters,
    JumpStats,
    choose_method,
    detect_jumps,
    dnu_group_mask,
    primary_cosmic_ray_rate,
)

DNU, SAT, JUMP = dqflags.DO_NOT_USE, dqflags.SATURATED, dqflags.JUMP_DET
TGROUP = 10.0


def linear_ramp(ngroups: int, nints: int = 1, ny: int = 5, nx: int = 5,
                rate: float = 100.0) -> np.ndarray:
    """DN ramp rising by ``rate`` per group with a small deterministic wiggle (< 1 DN)."""
    g = np.arange(ngroups, dtype=np.float64)
    wiggle = 0.3 * np.sin(1.7 * g)
    ramp = rate * g + wiggle
    return np.broadcast_to(ramp[None, :, None, None], (nints, ngroups, ny, nx)).astype(np.float32)


def run(data, gdq=None, gain=1.0, readnoise=5.0, nframes=1, params=None, **kw):
    """detect_jumps on uniform gain / read noise; returns (gdq, pdq, stats)."""
    nints, ngroups, ny, nx = data.shape
    gdq = np.zeros(data.shape, np.uint8) if gdq is None else gdq.copy()
    pdq = np.zeros((ny, nx), np.uint32)
    gain_a = np.full((ny, nx), gain, np.float32)
    rn_a = np.full((ny, nx), readnoise, np.float32)
    stats = detect_jumps(data, gdq, pdq, rn_a, gain_a, TGROUP, TGROUP, nframes,
                         params or JumpParameters(), **kw)
    return gdq, pdq, stats


def jump_groups(gdq, i, y, x):
    return [g for g in range(gdq.shape[1]) if gdq[i, g, y, x] & JUMP]


# ------------------------------------------------------------------------------------------
# parameters
# ------------------------------------------------------------------------------------------


def test_parameter_defaults_and_mapping():
    p = JumpParameters()
    assert (p.rejection_threshold, p.three_group_rejection_threshold,
            p.four_group_rejection_threshold) == (4.0, 6.0, 5.0)
    assert (p.min_jump_to_flag_neighbors, p.max_jump_to_flag_neighbors) == (10.0, 1000.0)
    assert p.flag_4_neighbors and p.only_use_ints
    assert (p.minimum_groups, p.minimum_sigclip_groups, p.min_diffs_single_pass) == (3, 100, 10)
    q = JumpParameters.from_mapping({"rejection_threshold": "5.5", "flag_4_neighbors": "False",
                                     "minimum_sigclip_groups": "50", "maximum_cores": "all",
                                     "skip": False, "sat_expand": 2})
    assert q.rejection_threshold == 5.5 and q.flag_4_neighbors is False
    assert q.minimum_sigclip_groups == 50
    with pytest.raises(ParameterError, match="unknown"):
        JumpParameters.from_mapping({"rejection_treshold": 4.0})
    with pytest.raises(ParameterError):
        JumpParameters.from_mapping({"minimum_groups": "3.5"})
    with pytest.raises(ParameterError):
        JumpParameters(rejection_threshold=-1.0)
    assert "maximum_cores" in IGNORED_JWST_KEYS


@pytest.mark.parametrize("key", ["expand_large_events", "find_showers"])
def test_snowballs_and_showers_not_implemented(key):
    with pytest.raises(NotImplementedError, match=key):
        JumpParameters(**{key: True})
    with pytest.raises(NotImplementedError):
        JumpParameters.from_mapping({key: "True"})


# ------------------------------------------------------------------------------------------
# known answers
# ------------------------------------------------------------------------------------------


def test_clean_linear_ramp_has_no_jumps():
    data = linear_ramp(10, nints=2)
    gdq, pdq, stats = run(data)
    assert not gdq.any() and not pdq.any()
    assert stats.method == "iterative" and stats.primary_crs == 0 and stats.new_jumps == 0


def test_single_jump_flags_group_and_four_neighbours():
    data = linear_ramp(10).copy()
    data[0, 5:, 2, 2] += 500.0          # 500 DN jump between groups 4 and 5
    gdq, _, stats = run(data, gain=2.0)
    assert jump_groups(gdq, 0, 2, 2) == [5]
    for y, x in ((1, 2), (3, 2), (2, 1), (2, 3)):
        assert jump_groups(gdq, 0, y, x) == [5], (y, x)
    assert not gdq[0, :, 1, 1].any()       # diagonal neighbours are not flagged
    assert np.count_nonzero(gdq & JUMP) == 5
    assert stats.primary_crs == 1 and stats.new_jumps == 5


def test_huge_jump_does_not_flag_neighbours_and_saturated_neighbour_skipped():
    data = linear_ramp(10).copy()
    data[0, 5:, 2, 2] += 50000.0        # > max_jump_to_flag_neighbors sigma
    data[0, 3:, 0, 0] += 500.0
    gdq0 = np.zeros(data.shape, np.uint8)
    gdq0[0, 3:, 0, 1] = SAT | DNU        # right neighbour of (0, 0) saturated from group 3
    gdq, _, _ = run(data, gdq=gdq0)
    assert jump_groups(gdq, 0, 2, 2) == [5]
    assert np.count_nonzero(gdq[0, :, 1:4, 1:4] & JUMP) == 1
    assert jump_groups(gdq, 0, 0, 0) == [3]
    assert jump_groups(gdq, 0, 1, 0) == [3]
    assert jump_groups(gdq, 0, 0, 1) == []


def test_saturation_from_group_k():
    data = linear_ramp(10).copy()
    data[0, 3:, 1, 1] += 800.0
    gdq0 = np.zeros(data.shape, np.uint8)
    gdq0[0, 6:, 1, 1] = SAT | DNU
    gdq0[0, 7, 1, 1] |= JUMP              # a stale jump on a saturated group is removed
    gdq, _, _ = run(data, gdq=gdq0, params=JumpParameters(flag_4_neighbors=False))
    assert jump_groups(gdq, 0, 1, 1) == [3]
    np.testing.assert_array_equal(gdq[0, 6:, 1, 1], SAT | DNU)


@pytest.mark.parametrize("second_diff, flagged", [(161.0, True), (159.0, False)])
def test_three_group_ramp_threshold(second_diff, flagged):
    # 2 differences: median = the smaller one (100 e), sigma = sqrt(100 + 0) = 10 e,
    # ratio = (d2 - 100) / 10 against three_group_rejection_threshold = 6
    data = np.zeros((1, 3, 1, 1), np.float32)
    data[0, :, 0, 0] = [0.0, 100.0, 100.0 + second_diff]
    gdq, _, stats = run(data, readnoise=0.0)
    assert jump_groups(gdq, 0, 0, 0) == ([2] if flagged else [])
    assert stats.primary_crs == int(flagged)


@pytest.mark.parametrize("last_diff, flagged", [(151.0, True), (149.0, False)])
def test_four_group_ramp_threshold(last_diff, flagged):
    # 3 differences: median = 100 e, sigma = 10 e, threshold four_group_rejection_threshold = 5
    data = np.zeros((1, 4, 1, 1), np.float32)
    data[0, :, 0, 0] = np.cumsum([0.0, 100.0, 100.0, last_diff])
    gdq, _, _ = run(data, readnoise=0.0)
    assert jump_groups(gdq, 0, 0, 0) == ([3] if flagged else [])


def test_five_group_ramp_clips_largest_difference():
    # 4 differences: the largest is dropped before the median (100), sigma 10, threshold 4
    data = np.zeros((1, 5, 1, 2), np.float32)
    data[0, :, 0, 0] = np.cumsum([0.0, 100.0, 100.0, 141.0, 100.0])
    data[0, :, 0, 1] = np.cumsum([0.0, 100.0, 100.0, 139.0, 100.0])
    gdq, _, _ = run(data, readnoise=0.0, params=JumpParameters(flag_4_neighbors=False))
    assert jump_groups(gdq, 0, 0, 0) == [3]
    assert jump_groups(gdq, 0, 0, 1) == []


def test_iterative_finds_two_jumps_and_negative_jump():
    data = linear_ramp(10, ny=1, nx=2).copy()
    data[0, 3:, 0, 0] += 300.0
    data[0, 7:, 0, 0] += 900.0
    data[0, 6:, 0, 1] -= 400.0                  # |diff| is used: a drop is also a jump
    gdq, _, stats = run(data, params=JumpParameters(flag_4_neighbors=False))
    assert jump_groups(gdq, 0, 0, 0) == [3, 7]
    assert jump_groups(gdq, 0, 0, 1) == [6]
    assert stats.primary_crs == 3


def test_after_jump_flagging():
    # dn1 = 100 DN over 25 s -> int(25 // 10) = 2 more groups after big jumps
    params = JumpParameters(flag_4_neighbors=False, after_jump_flag_dn1=100.0,
                            after_jump_flag_time1=25.0)
    data = linear_ramp(10, ny=1, nx=2).copy()
    data[0, 3:, 0, 0] += 500.0
    data[0, 3:, 0, 1] += 80.0                   # a jump, but below after_jump_flag_dn1
    gdq, _, _ = run(data, readnoise=1.0, params=params)
    assert jump_groups(gdq, 0, 0, 0) == [3, 4, 5]
    assert jump_groups(gdq, 0, 0, 1) == [3]


def test_too_few_groups_and_skips():
    data = linear_ramp(2)
    gdq, pdq, stats = run(data)
    assert stats.method == "not_run" and not gdq.any()
    # 5 groups of which 3 are DO_NOT_USE everywhere: fewer than 3 usable -> stcal skips (-99)
    data = linear_ramp(5).copy()
    data[0, 4:, 1, 1] += 900.0
    gdq0 = np.zeros(data.shape, np.uint8)
    gdq0[0, [0, 1, 2]] = DNU
    gdq0[0, 0, 2, 2] |= JUMP                    # removed: JUMP on a DO_NOT_USE group
    gdq, _, stats = run(data, gdq=gdq0)
    assert stats.skipped and stats.primary_crs == -99 and stats.method == "skipped"
    assert not (gdq & JUMP).any()


def test_choose_method():
    p = JumpParameters()
    none = np.zeros((1, 11), bool)                   # 10 differences: single pass
    assert choose_method(1, 11, none, p) == "single_pass"
    one_dnu = none.copy()
    one_dnu[0, 0] = True                             # 9 usable differences
    assert choose_method(1, 11, one_dnu, p) == "iterative"
    assert choose_method(100, 4, np.zeros((100, 4), bool), p) == "sigma_clip"
    p2 = JumpParameters(only_use_ints=False)
    assert choose_method(2, 60, np.zeros((2, 60), bool), p2) == "sigma_clip"
    assert choose_method(2, 40, np.zeros((2, 40), bool), p2) == "single_pass"


def test_bad_gain_flags_pixel_dq():
    data = linear_ramp(5, ny=2, nx=2)
    gdq = np.zeros(data.shape, np.uint8)
    pdq = np.zeros((2, 2), np.uint32)
    gain = np.array([[1.0, 0.0], [np.nan, -1.0]], np.float32)
    stats = detect_jumps(data, gdq, pdq, np.ones((2, 2), np.float32), gain, TGROUP, TGROUP, 1,
                         JumpParameters())
    bad = dqflags.NO_GAIN_VALUE | DNU
    np.testing.assert_array_equal(pdq, [[0, bad], [bad, bad]])
    np.testing.assert_array_equal(stats.bad_gain_per_row, [1, 2])


def test_primary_cosmic_ray_rate():
    # 2 ints x 10 groups, 1 all-DO_NOT_USE group: 17 usable group times of 10.737 s
    rate = primary_cosmic_ray_rate(340, 2, 10, 1, 10.737, 2048, 2048)
    assert rate == pytest.approx(1000 * 340 / (10.737 * 17 * 2048 * 2048), rel=1e-15)
    assert primary_cosmic_ray_rate(5, 1, 1, 0, 10.0, 4, 4) is None


# ------------------------------------------------------------------------------------------
# chunking
# ------------------------------------------------------------------------------------------


def random_exposure(seed, nints, ngroups, ny, nx, jump_frac=0.02, sat_frac=0.01,
                    dnu_frac=0.005, nframes=1):
    """Noisy DN ramps with injected jumps (both signs), saturation and DO_NOT_USE groups."""
    rng = np.random.default_rng(seed)
    gain = rng.uniform(1.5, 2.5, (ny, nx)).astype(np.float32)
    readnoise = rng.uniform(7.0, 13.0, (ny, nx)).astype(np.float32)
    flux = rng.uniform(0.0, 300.0, (ny, nx))
    electrons = rng.poisson(np.broadcast_to(flux * gain, (nints, ngroups, ny, nx)))
    ramp = np.cumsum(electrons, axis=1).astype(np.float64)
    ramp += rng.normal(0.0, 1.0, ramp.shape) * (readnoise * gain / np.sqrt(2 * nframes))
    data = ramp / gain
    gdq = np.zeros(data.shape, np.uint8)
    n = int(jump_frac * nints * ny * nx)
    amp = rng.choice([-1.0, 1.0], n, p=[0.1, 0.9]) * 10 ** rng.uniform(0.5, 3.5, n)
    for i, g, y, x, a in zip(rng.integers(0, nints, n), rng.integers(1, ngroups, n),
                             rng.integers(0, ny, n), rng.integers(0, nx, n), amp):
        data[i, g:, y, x] += a
    n = int(sat_frac * nints * ny * nx)
    for i, g, y, x in zip(rng.integers(0, nints, n), rng.integers(0, ngroups, n),
                          rng.integers(0, ny, n), rng.integers(0, nx, n)):
        gdq[i, g:, y, x] |= SAT | DNU
    n = int(dnu_frac * nints * ngroups * ny * nx)
    for i, g, y, x in zip(rng.integers(0, nints, n), rng.integers(0, ngroups, n),
                          rng.integers(0, ny, n), rng.integers(0, nx, n)):
        gdq[i, g, y, x] |= DNU
    return data.astype(np.float32), gdq, np.zeros((ny, nx), np.uint32), readnoise, gain


@pytest.mark.parametrize("params", [
    JumpParameters(),
    JumpParameters(after_jump_flag_dn1=30.0, after_jump_flag_time1=25.0,
                   min_jump_to_flag_neighbors=4.0),
])
def test_chunked_equals_whole_frame(params):
    data, gdq0, pdq0, rn, gain = random_exposure(3, 2, 6, 40, 24, jump_frac=0.2)
    gain[5, 3] = 0.0                                 # a bad-gain pixel (pixel DQ)
    whole_gdq, whole_pdq = gdq0.copy(), pdq0.copy()
    whole = detect_jumps(data, whole_gdq, whole_pdq, rn, gain, TGROUP, TGROUP, 1, params)
    assert whole.primary_crs > 50

    frame_dnu = dnu_group_mask(gdq0)
    gain_median = float(np.nanmedian(gain))
    ny = data.shape[2]
    for rows, halo in ((7, 1), (5, 2), (16, 3)):
        out_gdq, out_pdq = gdq0.copy(), pdq0.copy()
        parts = []
        for start in range(0, ny, rows):
            stop = min(start + rows, ny)
            lo, hi = max(start - halo, 0), min(stop + halo, ny)
            chunk_gdq, chunk_pdq = gdq0[:, :, lo:hi].copy(), pdq0[lo:hi].copy()
            parts.append(detect_jumps(
                data[:, :, lo:hi], chunk_gdq, chunk_pdq, rn[lo:hi], gain[lo:hi], TGROUP, TGROUP,
                1, params, frame_dnu_groups=frame_dnu, gain_median=gain_median,
                halo=(start - lo, hi - stop)))
            inner = slice(start - lo, start - lo + stop - start)
            out_gdq[:, :, start:stop] = chunk_gdq[:, :, inner]
            out_pdq[start:stop] = chunk_pdq[inner]
        np.testing.assert_array_equal(out_gdq, whole_gdq)
        np.testing.assert_array_equal(out_pdq, whole_pdq)
        combined = JumpStats.combine(parts)
        np.testing.assert_array_equal(combined.primary_crs_per_row, whole.primary_crs_per_row)
        np.testing.assert_array_equal(combined.new_jumps_per_row, whole.new_jumps_per_row)
        assert combined.primary_crs == whole.primary_crs


def test_chunk_without_halo_differs_at_edges():
    """Guard for the test above: dropping the halo loses neighbour flags across chunk edges."""
    data, gdq0, pdq0, rn, gain = random_exposure(3, 2, 6, 40, 24, jump_frac=0.2)
    whole_gdq = gdq0.copy()
    detect_jumps(data, whole_gdq, pdq0.copy(), rn, gain, TGROUP, TGROUP, 1, JumpParameters())
    out = gdq0.copy()
    for start in range(0, 40, 5):
        chunk = gdq0[:, :, start:start + 5].copy()
        detect_jumps(data[:, :, start:start + 5], chunk, pdq0[start:start + 5].copy(),
                     rn[start:start + 5], gain[start:start + 5], TGROUP, TGROUP, 1,
                     JumpParameters())
        out[:, :, start:start + 5] = chunk
    assert np.count_nonzero(out != whole_gdq) > 0


def test_new_jump_count_matches_flags():
    data, gdq0, pdq, rn, gain = random_exposure(5, 1, 8, 20, 20, jump_frac=0.3)
    gdq = gdq0.copy()
    stats = detect_jumps(data, gdq, pdq, rn, gain, TGROUP, TGROUP, 1, JumpParameters())
    per_row = ((gdq & JUMP) != 0).sum(axis=(0, 1, 3)) - ((gdq0 & JUMP) != 0).sum(axis=(0, 1, 3))
    np.testing.assert_array_equal(stats.new_jumps_per_row, per_row)


# ------------------------------------------------------------------------------------------
# parity with stcal 1.20 / jwst 3.0.0
# ------------------------------------------------------------------------------------------


def stcal_jumps(data, gdq, pdq, readnoise, gain, nframes, params):
    """stcal's detect_jumps_data as jwst's JumpStep drives it (maximum_cores='1')."""
    from stcal.jump.jump import detect_jumps_data
    from stcal.jump.jump_class import JumpData

    flags = {name: value for name, value in dqflags.PIXEL.items()}
    jd = JumpData(gain2d=gain, rnoise2d=readnoise, dqflags=flags)
    jd.init_arrays_from_arrays(data.copy(), gdq.copy(), pdq.copy())
    jd.nframes = nframes
    jd.dt_group = np.ones(1)
    jd.n_reads_groupdiff = np.ones(1) * 2 * nframes
    jd.set_detection_settings(params.rejection_threshold, params.three_group_rejection_threshold,
                              params.four_group_rejection_threshold,
                              params.max_jump_to_flag_neighbors,
                              params.min_jump_to_flag_neighbors, params.flag_4_neighbors)
    jd.set_after_jump(params.after_jump_flag_dn1, int(params.after_jump_flag_time1 // TGROUP),
                      params.after_jump_flag_dn2, int(params.after_jump_flag_time2 // TGROUP))
    jd.set_sigma_clipping_info(params.minimum_groups, params.minimum_sigclip_groups,
                               params.only_use_ints)
    jd.min_diffs_single_pass = params.min_diffs_single_pass
    jd.max_cores = "1"
    new_gdq, new_pdq, ncrs, _ = detect_jumps_data(jd)
    return new_gdq, new_pdq, int(ncrs)


PARITY_CASES = [
    # (id, seed, nints, ngroups, size, nframes, params, extra)
    ("3grp", 1, 2, 3, 32, 1, {}, {}),
    ("4grp", 2, 2, 4, 32, 1, {}, {}),
    ("5grp-1int", 3, 1, 5, 32, 1, {}, {}),
    ("10grp-3int", 4, 3, 10, 24, 1, {}, {}),
    ("nframes4-weird", 5, 2, 7, 24, 4, {}, {"weird": True}),
    ("prejump-quantized", 6, 1, 9, 24, 1, {}, {"prejump": True, "quantize": True}),
    ("single-pass", 7, 2, 12, 24, 1, {}, {}),
    ("single-pass->iterative", 8, 1, 11, 24, 1, {}, {"dnu_planes": [(0, 10)]}),
    ("skipped", 9, 2, 5, 16, 1, {}, {"dnu_planes": [(0, 0), (0, 3), (0, 4)]}),
    ("after-jump", 10, 2, 8, 24, 1,
     {"after_jump_flag_dn1": 40.0, "after_jump_flag_time1": 25.0,
      "after_jump_flag_dn2": 600.0, "after_jump_flag_time2": 65.0}, {}),
    ("neighbour-window", 11, 1, 6, 24, 1,
     {"min_jump_to_flag_neighbors": 3.0, "max_jump_to_flag_neighbors": 40.0}, {}),
    ("sigclip-ints", 12, 100, 4, 8, 1, {}, {"weird": True}),
    ("sigclip-all", 13, 3, 40, 8, 1, {"only_use_ints": False}, {"quantize": True}),
]


@pytest.mark.parity
@pytest.mark.parametrize("case", PARITY_CASES, ids=[c[0] for c in PARITY_CASES])
def test_parity_with_stcal(case):
    pytest.importorskip("stcal.jump.jump")
    logging.getLogger("stcal").setLevel(logging.WARNING)
    _, seed, nints, ngroups, size, nframes, pkw, extra = case
    params = JumpParameters(**pkw)
    data, gdq, pdq, rn, gain = random_exposure(seed, nints, ngroups, size, size, jump_frac=0.05,
                                               nframes=nframes)
    if extra.get("quantize"):
        data = np.round(data)                    # integer DN: many ties between differences
    if extra.get("weird"):
        gain[0, :3] = [np.nan, 0.0, -1.5]
        rn[1, :3] = [0.0, np.nan, 0.0]
        data[0, 1, 2, 2] = np.nan
        data[:, :, 3, 3] = 5.0                   # constant ramp: all differences equal
        rn[3, 3] = 0.0
    if extra.get("prejump"):
        gdq[np.random.default_rng(seed).random(gdq.shape) < 0.01] |= JUMP
    for i, g in extra.get("dnu_planes", []):
        gdq[i, g] |= DNU

    ref_gdq, ref_pdq, ref_crs = stcal_jumps(data, gdq, pdq, rn, gain, nframes, params)
    ours_gdq, ours_pdq = gdq.copy(), pdq.copy()
    stats = detect_jumps(data, ours_gdq, ours_pdq, rn, gain, TGROUP, TGROUP, nframes, params)

    ref_jump = (ref_gdq & JUMP) != 0
    ours_jump = (ours_gdq & JUMP) != 0
    ndiff = np.count_nonzero(ref_jump != ours_jump)
    assert ndiff <= 0.001 * max(np.count_nonzero(ref_jump), 1)
    np.testing.assert_array_equal(ours_gdq, ref_gdq)     # in practice: identical
    np.testing.assert_array_equal(ours_pdq, ref_pdq)
    assert stats.primary_crs == ref_crs
    if case[0] not in ("skipped",):
        assert np.count_nonzero(ref_jump & ~((gdq & JUMP) != 0)) > 0


@pytest.mark.parity
def test_parity_with_jwst_jump_step(tmp_path, monkeypatch):
    """jwst's JumpStep.process (reference files injected) vs detect_jumps + PRIMECRS."""
    pytest.importorskip("jwst.jump")
    monkeypatch.setenv("STPIPE_DISABLE_CRDS_STEPPARS", "1")
    from jwst.jump import JumpStep
    from stdatamodels.jwst import datamodels

    nints, ngroups, ny, nx, nframes, tgroup = 2, 7, 24, 20, 4, 21.47
    data, gdq, pdq, rn, gain = random_exposure(21, nints, ngroups, ny, nx, jump_frac=0.1,
                                               nframes=nframes)
    model = datamodels.RampModel(data=data, groupdq=gdq, pixeldq=pdq)
    model.meta.instrument.name = "NIRCAM"
    model.meta.instrument.detector = "NRCA1"
    model.meta.exposure.nframes = nframes
    model.meta.exposure.group_time = tgroup
    model.meta.exposure.frame_time = tgroup / nframes
    model.meta.exposure.ngroups = ngroups
    model.meta.exposure.nints = nints
    model.meta.subarray.name = "FULL"
    model.meta.subarray.xstart, model.meta.subarray.ystart = 1, 1
    model.meta.subarray.xsize, model.meta.subarray.ysize = nx, ny
    refs = {}
    for kind, cls, arr in (("gain", datamodels.GainModel, gain),
                           ("readnoise", datamodels.ReadnoiseModel, rn)):
        ref = cls(data=arr)
        ref.meta.instrument.name = "NIRCAM"
        ref.meta.subarray.xstart, ref.meta.subarray.ystart = 1, 1
        ref.meta.subarray.xsize, ref.meta.subarray.ysize = nx, ny
        refs[kind] = str(tmp_path / f"{kind}.fits")
        ref.save(refs[kind])
    step = JumpStep(after_jump_flag_dn1=50.0, after_jump_flag_time1=50.0)
    step.get_reference_file = lambda _model, kind: refs[kind]
    logging.getLogger("stpipe").setLevel(logging.WARNING)
    result = step.process(model)

    params = JumpParameters(after_jump_flag_dn1=50.0, after_jump_flag_time1=50.0)
    ours_gdq, ours_pdq = gdq.copy(), pdq.copy()
    stats = detect_jumps(data, ours_gdq, ours_pdq, rn, gain, tgroup / nframes, tgroup, nframes,
                         params)
    np.testing.assert_array_equal(ours_gdq, result.groupdq)
    np.testing.assert_array_equal(ours_pdq, result.pixeldq)
    n_dnu = int(dnu_group_mask(ours_gdq).sum())
    rate = primary_cosmic_ray_rate(stats.primary_crs, nints, ngroups, n_dnu, tgroup, ny, nx)
    assert rate == result.meta.exposure.primary_cosmic_rays


def test_non_contiguous_and_readonly_inputs():
    data, gdq0, pdq0, rn, gain = random_exposure(8, 1, 6, 12, 10, jump_frac=0.3)
    ref_gdq, ref_pdq = gdq0.copy(), pdq0.copy()
    detect_jumps(data, ref_gdq, ref_pdq, rn, gain, TGROUP, TGROUP, 1, JumpParameters())
    big_gdq = np.zeros((1, 6, 16, 10), np.uint8)
    big_gdq[:, :, 2:14] = gdq0
    view = big_gdq[:, :, 2:14]                   # a row slice: not C-contiguous
    big_data = np.zeros((1, 6, 16, 10), np.float32)
    big_data[:, :, 2:14] = data
    ro_data = big_data[:, :, 2:14]
    ro_data.flags.writeable = False
    pdq = pdq0.copy()
    detect_jumps(ro_data, view, pdq, rn, gain, TGROUP, TGROUP, 1, JumpParameters())
    np.testing.assert_array_equal(view, ref_gdq)
    np.testing.assert_array_equal(pdq, ref_pdq)
    assert not big_gdq[:, :, :2].any() and not big_gdq[:, :, 14:].any()
