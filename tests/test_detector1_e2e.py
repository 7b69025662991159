"""calwebb_detector1 end to end: the CLI on generated files, the products, the errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from calstream.daemon.cli import EXIT_INPUT, EXIT_NOT_IMPLEMENTED, EXIT_OK, EXIT_REFERENCE, EXIT_USAGE, main
from calstream.steps import dqflags
from calstream.steps.detector1 import calibrate_file, open_ramp_source, plan_detector1


def _run(*args: str) -> int:
    return main(["run", *args])


@pytest.fixture(scope="module")
def pipeline_run(sub160_uncal: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("d1")
    assert _run("calwebb_detector1", str(sub160_uncal), "--output-dir", str(out)) == EXIT_OK
    return out


def _product(folder: Path, suffix: str) -> Path:
    (path,) = folder.glob(f"*_{suffix}.fits")
    return path


def test_products_validate_and_carry_provenance(pipeline_run: Path) -> None:
    datamodels = pytest.importorskip("stdatamodels.jwst.datamodels")
    rate, rateints = _product(pipeline_run, "rate"), _product(pipeline_run, "rateints")
    with datamodels.open(rate) as model:
        assert type(model).__name__ == "ImageModel"
        model.validate()
        assert model.data.dtype.kind == "f" and model.data.dtype.itemsize == 4
        assert model.dq.dtype.kind == "u" and model.dq.dtype.itemsize == 4
        assert model.meta.ref_file.crds.context_used == "jwst_0002.pmap"
    with datamodels.open(rateints) as model:
        assert type(model).__name__ == "CubeModel"
        model.validate()
    header = fits.getheader(rate)
    assert header["CAL_VER"] and header["CRDS_VER"]
    for key in ("R_MASK", "R_SATURA", "R_SUPERB", "R_LINEAR", "R_DARK", "R_GAIN", "R_READNO"):
        assert header[key].startswith("crds://jwst_nircam_"), key
    for key in ("S_DQINIT", "S_SATURA", "S_SUPERB", "S_REFPIX", "S_LINEAR", "S_DARK", "S_JUMP", "S_RAMP"):
        assert header[key] == "COMPLETE", key
    for key in ("S_GRPSCL", "S_IPC", "S_CHGMIG", "S_PCTFRM", "S_CLNFNS", "S_PERSIS", "S_GANSCL"):
        assert header[key] == "SKIPPED", key
    assert header["PRIMECRS"] >= 0
    assert fits.getheader(rate, "SCI")["BUNIT"] == "DN/s"


def test_rate_matches_the_generated_truth(pipeline_run: Path, sub160_observation) -> None:
    truth = sub160_observation.exposures[0]
    with fits.open(_product(pipeline_run, "rate")) as hdul:
        sci, dq = hdul["SCI"].data, hdul["DQ"].data
    good = (dq & (dqflags.DO_NOT_USE | dqflags.REFERENCE_PIXEL)) == 0
    expected = truth.sky_rate_dn * truth.gain_factor + truth.dark_rate_dn
    assert np.nanmedian(sci[good]) == pytest.approx(expected, rel=0.1)
    # reference pixels carry no light: their rates scatter around zero
    assert (dq & dqflags.REFERENCE_PIXEL).any()


@pytest.mark.parametrize("grow", [1, 2])
def test_chunk_size_does_not_change_the_answer(sub160_uncal: Path, tmp_path: Path, grow: int) -> None:
    params = {"saturation": {"n_pix_grow_sat": grow}}
    small = calibrate_file(sub160_uncal, tmp_path / "a", chunk_rows=7, fsync=False, cli_steps=params)
    large = calibrate_file(sub160_uncal, tmp_path / "b", chunk_rows=1000, fsync=False, cli_steps=params)
    for kind in ("rate", "rateints"):
        with fits.open(small.products[kind]) as a, fits.open(large.products[kind]) as b:
            for ext in ("SCI", "ERR", "DQ", "VAR_POISSON", "VAR_RNOISE"):
                np.testing.assert_array_equal(a[ext].data, b[ext].data, err_msg=f"{kind} {ext}")


def test_single_steps_reproduce_the_pipeline(sub160_uncal: Path, pipeline_run: Path, tmp_path: Path) -> None:
    assert _run("calwebb_detector1", str(sub160_uncal), "--output-dir", str(tmp_path),
                "--steps.jump.skip=true", "--steps.ramp_fit.skip=true") == EXIT_OK
    ramp = _product(tmp_path, "ramp")
    assert fits.getheader(ramp)["S_JUMP"] == "SKIPPED"
    assert _run("jump", str(ramp), "--output-dir", str(tmp_path)) == EXIT_OK
    jumped = _product(tmp_path, "jump")
    assert fits.getheader(jumped)["S_JUMP"] == "COMPLETE"
    assert _run("ramp_fit", str(jumped), "--output-dir", str(tmp_path)) == EXIT_OK
    with fits.open(_product(tmp_path, "rate")) as a, fits.open(_product(pipeline_run, "rate")) as b:
        np.testing.assert_array_equal(a["SCI"].data, b["SCI"].data)
        np.testing.assert_array_equal(a["DQ"].data, b["DQ"].data)


def test_context_pin_and_overrides(sub160_uncal: Path, crds_cache, tmp_path: Path) -> None:
    source = open_ramp_source(sub160_uncal)
    try:
        old = plan_detector1(source.exposure, context="jwst_0001.pmap")
        new = plan_detector1(source.exposure, context="jwst_0002.pmap")
        # jwst_0002 changes the NRCA1 gain for observations after a date; ours is after it
        assert Path(old.references["gain"]).name != Path(new.references["gain"]).name
        assert old.references["dark"] == new.references["dark"]
        dark = old.references["dark"]
        pinned = plan_detector1(source.exposure, context="jwst_0001.pmap",
                                cli_steps={"dark_current": {"override_dark": dark},
                                           "jump": {"rejection_threshold": "7.5"}})
        assert pinned.references["dark"] == dark
        assert pinned.params["jump"]["rejection_threshold"] == 7.5
        assert "CRDS pars-jumpstep" in " ".join(pinned.parameter_sources)
    finally:
        source.close()
    out = tmp_path / "pinned"
    assert _run("calwebb_detector1", str(sub160_uncal), "--output-dir", str(out),
                "--crds-context", "jwst_0001.pmap", f"--steps.dark_current.override_dark={dark}") == EXIT_OK
    header = fits.getheader(_product(out, "rate"))
    assert header["CRDS_CTX"] == "jwst_0001.pmap"
    assert header["R_DARK"] == os.path.abspath(dark) or header["R_DARK"].startswith("crds://")


def test_toml_parameter_file(sub160_uncal: Path, tmp_path: Path) -> None:
    config = tmp_path / "params.toml"
    config.write_text("[steps.jump]\nrejection_threshold = 6.5\n[steps.ipc]\nskip = true\n")
    source = open_ramp_source(sub160_uncal)
    try:
        plan = plan_detector1(source.exposure, parameter_file=config,
                              cli_steps={"jump": {"rejection_threshold": "8"}})
        assert plan.params["jump"]["rejection_threshold"] == 8.0    # CLI beats the file
        plan = plan_detector1(source.exposure, parameter_file=config)
        assert plan.params["jump"]["rejection_threshold"] == 6.5    # the file beats CRDS pars
    finally:
        source.close()


# -- bad input --------------------------------------------------------------------------------------
def _edited_copy(src: Path, dst: Path, edit) -> Path:
    with fits.open(src) as hdul:
        edit(hdul)
        hdul.writeto(dst, overwrite=True)
    return dst


def _expect_failure(capsys, path: Path, out: Path, code: int, text: str, *extra: str) -> None:
    assert _run("calwebb_detector1", str(path), "--output-dir", str(out), *extra) == code
    message = capsys.readouterr().err
    assert text in message, message
    assert not out.exists() or not any(out.iterdir()), "a failed run must write nothing"


def test_truncated_file(sub160_uncal: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "jw01234001001_02101_00009_nrca1_uncal.fits"
    data = sub160_uncal.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    _expect_failure(capsys, bad, tmp_path / "out", EXIT_INPUT, bad.name)


def test_not_fits(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "x_uncal.fits"
    bad.write_text("SIMPLE? no.\n" * 400)
    _expect_failure(capsys, bad, tmp_path / "out", EXIT_INPUT, "not a readable FITS file")


def test_missing_sci(sub160_uncal: Path, tmp_path: Path, capsys) -> None:
    bad = _edited_copy(sub160_uncal, tmp_path / "nosci_uncal.fits", lambda h: h.pop(h.index_of("SCI")))
    _expect_failure(capsys, bad, tmp_path / "out", EXIT_INPUT, "no SCI extension")


def test_wrong_dimensionality(sub160_uncal: Path, tmp_path: Path, capsys) -> None:
    def squash(hdul: fits.HDUList) -> None:
        hdul["SCI"].data = np.ascontiguousarray(hdul["SCI"].data[0])
    bad = _edited_copy(sub160_uncal, tmp_path / "flat_uncal.fits", squash)
    _expect_failure(capsys, bad, tmp_path / "out", EXIT_INPUT, "must be 4-D")


def test_missing_keyword(sub160_uncal: Path, tmp_path: Path, capsys) -> None:
    bad = _edited_copy(sub160_uncal, tmp_path / "nokw_uncal.fits", lambda h: h[0].header.remove("TGROUP"))
    _expect_failure(capsys, bad, tmp_path / "out", EXIT_INPUT, "TGROUP")


def test_unknown_instrument(sub160_uncal: Path, tmp_path: Path, capsys) -> None:
    bad = _edited_copy(sub160_uncal, tmp_path / "inst_uncal.fits",
                       lambda h: h[0].header.__setitem__("INSTRUME", "WFC3"))
    _expect_failure(capsys, bad, tmp_path / "out", EXIT_INPUT, "unknown instrument")


def test_miri_says_not_implemented(sub160_uncal: Path, tmp_path: Path, capsys) -> None:
    bad = _edited_copy(sub160_uncal, tmp_path / "miri_uncal.fits",
                       lambda h: h[0].header.__setitem__("INSTRUME", "MIRI"))
    _expect_failure(capsys, bad, tmp_path / "out", EXIT_NOT_IMPLEMENTED, "MIRI")


def test_reference_not_in_crds(sub160_uncal: Path, tmp_path: Path, capsys) -> None:
    bad = _edited_copy(sub160_uncal, tmp_path / "nrca3_uncal.fits",
                       lambda h: h[0].header.__setitem__("DETECTOR", "NRCA3"))
    _expect_failure(capsys, bad, tmp_path / "out", EXIT_REFERENCE, "reference")


def test_unimplemented_step_requested(sub160_uncal: Path, tmp_path: Path, capsys) -> None:
    _expect_failure(capsys, sub160_uncal, tmp_path / "out", EXIT_NOT_IMPLEMENTED, "persistence",
                    "--steps.persistence.skip=false")


def test_misspelt_parameter(sub160_uncal: Path, tmp_path: Path, capsys) -> None:
    _expect_failure(capsys, sub160_uncal, tmp_path / "out", EXIT_USAGE, "rejection_treshold",
                    "--steps.jump.rejection_treshold=5")


def test_cli_as_a_process(sub160_uncal: Path, crds_cache, tmp_path: Path) -> None:
    """The installed console script, as a newcomer runs it."""
    exe = shutil.which("calstream", path=str(Path(sys.executable).parent))
    assert exe, "the calstream console script is not installed"
    result = subprocess.run([exe, "--crds-path", str(crds_cache.root), "run", "calwebb_detector1",
                             str(sub160_uncal), "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "rate" in result.stdout and _product(tmp_path, "rate").exists()   # flushed before the fast exit
    bad = tmp_path / "jw01234001001_02101_00009_nrca1_uncal.fits"
    bad.write_bytes(b"not a FITS file")
    failed = subprocess.run([exe, "run", "calwebb_detector1", str(bad), "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert failed.returncode == EXIT_INPUT and "bad input" in failed.stderr and bad.name in failed.stderr
