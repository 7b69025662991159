"""outlier_detection: flagging rule and median with known answers; cosmic rays of a synthetic field
flagged; parity with jwst's OutlierDetectionStep."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits

from calstream.steps import dqflags
from calstream.steps.outlier import (MedianStack, abs_derivative, apply_outlier_flags, flag_outliers,
                                     weight_threshold)

OUTLIER, DNU = int(dqflags.OUTLIER), int(dqflags.DO_NOT_USE)


def test_abs_derivative_known_answer():
    a = np.array([[0.0, 1.0, 1.0], [4.0, 1.0, np.nan]], np.float32)
    d = abs_derivative(a)
    # each pixel: largest |difference| to its up/down/left/right neighbours (NaN neighbours ignored)
    np.testing.assert_array_equal(d[0], [4.0, 1.0, 0.0])
    np.testing.assert_array_equal(d[1, :2], [4.0, 3.0])
    assert np.isnan(d[1, 2])


def test_flag_rule_snr_growth_and_derivative():
    shape = (20, 20)
    blot = np.full(shape, 10.0, np.float32)
    err = np.ones(shape, np.float32)
    sci = blot.copy()
    sci[5, 5] = 10.0 + 6.0        # > 5 sigma: flagged
    sci[5, 6] = 10.0 + 4.5        # 4.5 sigma next to it: flagged by the 3x3 growth (> 4 sigma)
    sci[12, 12] = 10.0 + 4.5      # 4.5 sigma alone: not flagged
    sci[15, 3] = 10.0 + 3.9       # next to nothing: not flagged
    mask = flag_outliers(sci, err, blot)
    assert set(zip(*np.nonzero(mask))) == {(5, 5), (5, 6)}
    # a steep blot (star edge): 1.2 x |derivative| raises the first threshold
    steep = blot.copy()
    steep[5, 4] = 30.0            # derivative 20 at (5, 5) -> threshold 1.2*20 + 5
    assert not flag_outliers(sci, err, steep)[5, 5]
    # the sky level still in the data is removed before comparing
    assert not flag_outliers(sci + 100.0, err, blot, backg=100.0)[12, 12]
    assert flag_outliers(sci + 100.0, err, blot, backg=100.0)[5, 5]


def test_flagging_in_row_blocks_equals_whole_frame():
    rng = np.random.default_rng(2)
    blot = rng.normal(10.0, 3.0, (97, 53)).astype(np.float32)
    sci = (blot + rng.normal(0.0, 1.0, blot.shape)).astype(np.float32)
    sci[rng.integers(0, 97, 60), rng.integers(0, 53, 60)] += 30.0
    err = np.ones_like(sci)
    whole = flag_outliers(sci, err, blot, block_rows=1000)
    assert whole.sum() > 40
    np.testing.assert_array_equal(flag_outliers(sci, err, blot, block_rows=7), whole)
    dq = np.zeros(sci.shape, np.uint32)
    assert apply_outlier_flags(dq, whole) == whole.sum()
    assert np.all(dq[whole] == OUTLIER | DNU) and np.all(dq[~whole] == 0)


def test_median_stack_in_blocks(tmp_path):
    rng = np.random.default_rng(4)
    images = rng.normal(0.0, 1.0, (5, 33, 21)).astype(np.float32)
    images[rng.random(images.shape) < 0.2] = np.nan
    images[:, 0, 0] = np.nan
    with MedianStack(5, (33, 21), directory=tmp_path, block_bytes=5 * 21 * 4 * 4) as stack:
        for i, img in enumerate(images):
            stack.set(i, img)
        med = stack.median()
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        expected = np.nanmedian(images, axis=0)
    np.testing.assert_array_equal(med, expected)
    assert list(tmp_path.iterdir()) == []          # the temporary file is gone


def test_weight_threshold_and_pairs():
    wht = np.zeros((10, 10), np.float32)
    wht[2:8, 2:8] = 4.0
    wht[5, 5] = 400.0            # clipped away
    assert weight_threshold(wht, 0.7) == pytest.approx(2.8)


# ---------------------------------------------------------------------------------------------
# A synthetic field: truth and parity
# ---------------------------------------------------------------------------------------------

ONLY_OUTLIERS = {"tweakreg": {"skip": True}, "skymatch": {"skip": True}, "resample": {"skip": True},
                 "source_catalog": {"skip": True}}


@pytest.fixture(scope="module")
def outlier_run(image3_field, tmp_path_factory):
    from calstream.steps.image3 import calibrate_association

    out = tmp_path_factory.mktemp("outlier")
    result = calibrate_association(image3_field.asn_path, out, cli_steps=ONLY_OUTLIERS, context=image3_field.context)
    return result


def _coverage(infos, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """How many exposures see each sky position."""
    n = np.zeros(len(ra), int)
    for info in infos:
        x, y = info.wcs.invert(ra, dec, with_bounding_box=False)
        n += (x >= -0.5) & (x <= info.shape[1] - 0.5) & (y >= -0.5) & (y <= info.shape[0] - 0.5)
    return n


def test_surviving_cosmic_rays_are_flagged(image3_field, outlier_run):
    """Every bright cosmic ray seen by >= 3 exposures is flagged (with 1 or 2 the median cannot
    reject it: that is the algorithm, in jwst too)."""
    from calstream.steps.calimage import read_cal_info

    assert outlier_run.status["outlier_detection"] == "COMPLETE"
    truth = json.loads(image3_field.truth_path.read_text())
    infos = [read_cal_info(p) for p in image3_field.cal_paths]
    crfs = {p.name: p for k, p in outlier_run.products.items() if k.startswith("crf:")}
    assert len(crfs) == len(image3_field.cal_paths)
    checked = 0
    for exposure in truth["exposures"]:
        crs = [c for c in exposure["surviving_crs"] if c["snr"] > 10 and not c["do_not_use"]]
        if not crs:
            continue
        seen = _coverage(infos, np.array([c["ra"] for c in crs]), np.array([c["dec"] for c in crs]))
        crs = [c for c, n in zip(crs, seen) if n >= 3]
        name = exposure["cal"].replace("_cal.fits", "_a3001_crf.fits")
        dq = fits.getdata(crfs[name], "DQ")
        sci = fits.getdata(crfs[name], "SCI")
        hit = [(dq[c["y"], c["x"]] & OUTLIER) != 0 for c in crs]
        assert np.mean(hit) >= 0.95, f"{name}: {sum(hit)}/{len(hit)} bright cosmic rays flagged"
        assert all(np.isnan(sci[c["y"], c["x"]]) for c, h in zip(crs, hit) if h)
        checked += len(crs)
    assert checked >= 20


@pytest.mark.parity
def test_parity_with_jwst_outlier_detection(image3_field, tmp_path):
    pytest.importorskip("jwst")
    from jwst.outlier_detection import OutlierDetectionStep

    from calstream.steps.synth.crds_cache import pinned_crds_env

    from calstream.steps.image3 import calibrate_association

    # jwst's per-pixel weighting (calstream's default is ivm-smed); both read CRDS's pars-outlierdetectionstep
    ours = calibrate_association(image3_field.asn_path, tmp_path,
                                 cli_steps={**ONLY_OUTLIERS, "outlier_detection": {"weight_type": "ivm"}},
                                 context=image3_field.context)
    with pinned_crds_env(image3_field.crds_root, image3_field.context):
        library = OutlierDetectionStep.call(str(image3_field.asn_path), in_memory=True)
    crfs = sorted(p for k, p in ours.products.items() if k.startswith("crf:"))
    agree, total, flagged = 0, 0, 0
    with library:
        for model, crf in zip(library, crfs):
            theirs = (model.dq & OUTLIER) != 0
            ours = (fits.getdata(crf, "DQ") & OUTLIER) != 0
            either = theirs | ours
            agree += int(np.sum(theirs == ours))
            total += theirs.size
            flagged += int(either.sum())
            assert np.sum(theirs & ours) >= 0.99 * either.sum(), crf.name
            library.shelve(model, modify=False)
    assert flagged > 0 and agree / total >= 0.99
