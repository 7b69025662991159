"""Whole-pipeline parity: calstream's calwebb_detector1 against jwst 3.0.0's Detector1Pipeline.

Both run on the same synthetic uncal file with the same local CRDS cache and the same pinned
context (jwst_0002.pmap), so they select the same references and pars-* parameter files.
jwst runs once per case (module-scoped fixture, 10-30 s each); the tests then check the
acceptance criteria on rate and rateints, and on the jump flags of the calibrated ramps
(jwst ``save_calibrated_ramp=True`` vs calstream's ``save_calibrated_ramp``):

* SCI within 1e-4 relative for unflagged pixels (jwst DQ without DO_NOT_USE), median far below;
* ERR, VAR_POISSON, VAR_RNOISE within 1e-3 relative (same pixels);
* DQ identical for >= 99.9 % of pixels;
* GROUPDQ JUMP_DET identical for >= 99.9 % of the groups either pipeline flagged.

Also: the same S_*/R_*/CRDS_CTX/PRIMECRS keywords, and jwst's RampFitStep on its saved ramp
against calstream's ramp_fit on its own (the ramp must carry AVDRKCUR, the dark current).

Relative difference: |calstream - jwst| / max(|jwst|, floor), floor = 1e-3 x the median |jwst|
of the compared pixels, so values crossing zero (reference-pixel rates, zero Poisson
variances) are judged against the array's scale rather than divided by ~0.

Cases: NRCA1 SUB160 RAPID 1x10 (chunked by 64 rows), NRCB1 SUB640 RAPID 3x10 (default
chunks), NRCA1 SUB160 MEDIUM8 1x6 (frame averaging with group gaps: dark frame averaging,
the saturation group-2 rule, read-noise scaling). MEDIUM8 needs a 58-frame dark, so it gets
its own CRDS cache instead of rewriting the session cache's SUB160 dark.

Run with ``-s`` to see the measured numbers (also stored with ``record_property``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from calstream.steps import dqflags
from calstream.steps.detector1 import calibrate_file
from calstream.steps.synth import generate_observation

pytestmark = pytest.mark.parity

CONTEXT = "jwst_0002.pmap"
SCI_RTOL = 1e-4
SCI_MEDIAN_MAX = 1e-6            # "far below" the 1e-4 bound
VAR_RTOL = 1e-3
DQ_MIN_IDENTICAL = 0.999
JUMP_MIN_IDENTICAL = 0.999
FLOOR_FRACTION = 1e-3


@dataclass(frozen=True)
class Case:
    """One exposure configuration."""

    name: str
    detector: str
    subarray: str
    readpatt: str
    ngroups: int
    nints: int
    chunk_rows: int
    own_cache: bool              # a private CRDS cache (longer dark) instead of the session's


CASES = (
    Case("sub160_rapid_1x10", "NRCA1", "SUB160", "RAPID", 10, 1, 64, False),
    Case("sub640_rapid_3x10", "NRCB1", "SUB640", "RAPID", 10, 3, 256, False),
    Case("sub160_medium8_1x6", "NRCA1", "SUB160", "MEDIUM8", 6, 1, 48, True),
)


@dataclass
class Products:
    """Paths of one pipeline's products for a case."""

    rate: Path
    rateints: Path
    ramp: Path


@dataclass
class CaseRun:
    case: Case
    jwst: Products
    calstream: Products


def _crds_env(root: Path):
    """CRDS_PATH=root and CRDS_CONTEXT pinned for jwst (calstream also gets context=...)."""
    from calstream.steps.synth.crds_cache import pinned_crds_env

    return pinned_crds_env(root, CONTEXT)


def _run_jwst(uncal: Path, out: Path) -> Products:
    pipeline = pytest.importorskip("jwst.pipeline")
    out.mkdir(parents=True, exist_ok=True)
    pipeline.Detector1Pipeline.call(str(uncal), save_results=True, output_dir=str(out),
                                    save_calibrated_ramp=True)
    stem = uncal.name.replace("_uncal.fits", "")
    return Products(out / f"{stem}_rate.fits", out / f"{stem}_rateints.fits", out / f"{stem}_ramp.fits")


def _run_calstream(uncal: Path, out: Path, chunk_rows: int) -> Products:
    result = calibrate_file(uncal, out, cli_pipeline={"save_calibrated_ramp": True}, context=CONTEXT,
                            chunk_rows=chunk_rows, fsync=False)
    return Products(result.products["rate"], result.products["rateints"], result.products["ramp"])


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def case_run(request, crds_cache, tmp_path_factory) -> CaseRun:
    """Generate the case's exposure, run jwst then calstream on it (once per module)."""
    pytest.importorskip("jwst.pipeline")
    case: Case = request.param
    base = tmp_path_factory.mktemp(case.name)
    root = base / "crds_cache" if case.own_cache else crds_cache.root
    if case == CASES[0]:
        uncal = request.getfixturevalue("sub160_uncal")      # the session's own SUB160 exposure
    else:
        saved_path = os.environ.get("CRDS_PATH")
        try:
            os.environ["CRDS_PATH"] = str(root)
            info = generate_observation(base / "uncal", root, detectors=(case.detector,),
                                        subarray=case.subarray, readpatt=case.readpatt,
                                        ngroups=case.ngroups, nints=case.nints, seed=0)
        finally:
            if saved_path is not None:
                os.environ["CRDS_PATH"] = saved_path
        (uncal,) = info.uncal_paths
    with _crds_env(root):
        theirs = _run_jwst(uncal, base / "jwst")
        ours = _run_calstream(uncal, base / "calstream", case.chunk_rows)
    return CaseRun(case, theirs, ours)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def relative_difference(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """|ours - theirs| / max(|theirs|, floor) in float64; floor = 1e-3 x median |theirs|."""
    ours = ours.astype(np.float64)
    theirs = theirs.astype(np.float64)
    scale = np.abs(theirs)
    floor = FLOOR_FRACTION * float(np.median(scale)) if scale.size else 0.0
    denom = np.maximum(scale, floor if floor > 0 else np.finfo(np.float64).tiny)
    return np.abs(ours - theirs) / denom


def _read(path: Path) -> dict[str, np.ndarray]:
    with fits.open(path) as hdul:
        return {ext: hdul[ext].data.copy() for ext in ("SCI", "ERR", "DQ", "VAR_POISSON", "VAR_RNOISE")}


def _pair(run: CaseRun, kind: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    ours, theirs = _read(getattr(run.calstream, kind)), _read(getattr(run.jwst, kind))
    assert ours["SCI"].shape == theirs["SCI"].shape, kind
    return ours, theirs


def _usable(theirs: dict[str, np.ndarray]) -> np.ndarray:
    """Pixels jwst did not flag DO_NOT_USE and gave a finite rate."""
    return ((theirs["DQ"] & dqflags.DO_NOT_USE) == 0) & np.isfinite(theirs["SCI"])


def _report(record_property, label: str, **numbers: float) -> None:
    text = " ".join(f"{k}={v:.3g}" for k, v in numbers.items())
    print(f"\n[parity] {label}: {text}")
    for key, value in numbers.items():
        record_property(f"{label} {key}", float(value))


KINDS = ("rate", "rateints")


# ---------------------------------------------------------------------------------------------
# Acceptance criteria
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_sci_matches_jwst(case_run: CaseRun, kind: str, record_property) -> None:
    ours, theirs = _pair(case_run, kind)
    good = _usable(theirs)
    assert good.mean() > 0.9, "the case must leave most pixels usable"
    # the same pixels are usable in both (NaN exactly where jwst has NaN)
    np.testing.assert_array_equal(np.isnan(ours["SCI"]), np.isnan(theirs["SCI"]))
    rel = relative_difference(ours["SCI"][good], theirs["SCI"][good])
    worst, median = float(rel.max()), float(np.median(rel))
    _report(record_property, f"{case_run.case.name} {kind} SCI", max_rel=worst, median_rel=median,
            frac_over=float(np.mean(rel > SCI_RTOL)))
    assert worst <= SCI_RTOL, f"SCI max relative difference {worst:.3g} (median {median:.3g})"
    assert median <= SCI_MEDIAN_MAX, f"SCI median relative difference {median:.3g}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ext", ["ERR", "VAR_POISSON", "VAR_RNOISE"])
def test_errors_match_jwst(case_run: CaseRun, kind: str, ext: str, record_property) -> None:
    ours, theirs = _pair(case_run, kind)
    good = _usable(theirs)
    rel = relative_difference(ours[ext][good], theirs[ext][good])
    worst, median = float(rel.max()), float(np.median(rel))
    _report(record_property, f"{case_run.case.name} {kind} {ext}", max_rel=worst, median_rel=median)
    assert worst <= VAR_RTOL, f"{ext} max relative difference {worst:.3g} (median {median:.3g})"


@pytest.mark.parametrize("kind", KINDS)
def test_dq_matches_jwst(case_run: CaseRun, kind: str, record_property) -> None:
    ours, theirs = _pair(case_run, kind)
    same = float(np.mean(ours["DQ"] == theirs["DQ"]))
    differing = np.unique(ours["DQ"] ^ theirs["DQ"])
    _report(record_property, f"{case_run.case.name} {kind} DQ", identical=same,
            n_differ=float(np.count_nonzero(ours["DQ"] != theirs["DQ"])))
    assert same >= DQ_MIN_IDENTICAL, f"DQ identical for {same:.5%} only; differing bits {differing[:10]}"


def test_jump_flags_match_jwst(case_run: CaseRun, record_property) -> None:
    with fits.open(case_run.calstream.ramp) as ours, fits.open(case_run.jwst.ramp) as theirs:
        ours_gdq, theirs_gdq = ours["GROUPDQ"].data, theirs["GROUPDQ"].data
    assert ours_gdq.shape == theirs_gdq.shape
    ours_jump = (ours_gdq & dqflags.JUMP_DET) > 0
    theirs_jump = (theirs_gdq & dqflags.JUMP_DET) > 0
    flagged = ours_jump | theirs_jump
    assert theirs_jump.any(), "the case must contain jumps for this test to mean anything"
    same = float(np.mean(ours_jump[flagged] == theirs_jump[flagged]))
    _report(record_property, f"{case_run.case.name} ramp JUMP_DET", identical_of_flagged=same,
            jwst=float(theirs_jump.sum()), calstream=float(ours_jump.sum()),
            groupdq_identical=float(np.mean(ours_gdq == theirs_gdq)))
    assert same >= JUMP_MIN_IDENTICAL, (
        f"jump flags agree on {same:.5%} of {flagged.sum()} flagged groups "
        f"(jwst {theirs_jump.sum()}, calstream {ours_jump.sum()})")



@pytest.mark.parametrize("kind", KINDS)
def test_provenance_matches_jwst(case_run: CaseRun, kind: str) -> None:
    """Same context, references, step statuses and cosmic-ray rate keywords as jwst."""
    ours = fits.getheader(getattr(case_run.calstream, kind))
    theirs = fits.getheader(getattr(case_run.jwst, kind))
    keys = sorted(k for k in set(theirs) | set(ours) if k.startswith(("S_", "R_")) or k == "CRDS_CTX")
    assert {k: ours.get(k) for k in keys} == {k: theirs.get(k) for k in keys}
    for key in ("PRIMECRS", "EXTNCRS"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), key


def test_relative_difference_floor() -> None:
    """The metric: relative to |jwst|, with a floor at 1e-3 of the median magnitude."""
    theirs = np.array([100.0, 100.0, 0.0, -50.0], dtype=np.float32)
    ours = np.array([100.01, 100.0, 1e-3, -50.0], dtype=np.float32)
    rel = relative_difference(ours, theirs)
    floor = 1e-3 * 75.0                                   # median of |theirs| = 75
    np.testing.assert_allclose(rel, [1e-4, 0.0, 1e-3 / floor, 0.0], rtol=1e-3)


def test_ramp_fit_alone_on_the_saved_ramps(case_run: CaseRun, crds_cache, tmp_path: Path) -> None:
    """jwst's RampFitStep on its calibrated ramp vs calstream's ramp_fit on its own: the ramp
    product must carry what ramp fitting needs (AVDRKCUR, the average dark current)."""
    if case_run.case != CASES[0]:
        pytest.skip("one case is enough for the single-step round trip")
    ramp_fitting = pytest.importorskip("jwst.ramp_fitting")
    with _crds_env(crds_cache.root):
        rate, rateints = ramp_fitting.RampFitStep.call(str(case_run.jwst.ramp))
        result = calibrate_file(case_run.calstream.ramp, tmp_path, only_step="ramp_fit", context=CONTEXT,
                                fsync=False)
    for model, kind in ((rate, "rate"), (rateints, "rateints")):
        ours = _read(result.products[kind])
        good = ((model.dq & dqflags.DO_NOT_USE) == 0) & np.isfinite(model.data)
        for ext, theirs, rtol in (("SCI", model.data, SCI_RTOL), ("VAR_POISSON", model.var_poisson, VAR_RTOL),
                                  ("VAR_RNOISE", model.var_rnoise, VAR_RTOL), ("ERR", model.err, VAR_RTOL)):
            worst = float(relative_difference(ours[ext][good], theirs[good]).max())
            assert worst <= rtol, f"{kind} {ext}: max relative difference {worst:.3g}"
        assert np.mean(ours["DQ"] == model.dq) >= DQ_MIN_IDENTICAL
