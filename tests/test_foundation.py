"""Unit tests of the foundation: DQ flags, row-chunk FITS I/O, exposure validation, parameters, products."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from calstream.steps import dqflags
from calstream.steps.errors import InputError, ParameterError
from calstream.steps.exposure import exposure_from_header
from calstream.steps.fitsio import RowReader, atomic_output, image_layout, open_header, write_hdulist
from calstream.steps.parameters import DETECTOR1_NIR, parse_cli_overrides, resolve
from calstream.steps.products import Provenance, product_path, reference_keyword, write_rate


# -- DQ -----------------------------------------------------------------------------------------
def test_interpret_flags_accepts_jwst_spellings() -> None:
    assert dqflags.interpret_flags("4+8") == 12
    assert dqflags.interpret_flags("JUMP_DET, DROPOUT") == 4 + 8
    assert dqflags.interpret_flags(["do_not_use"]) == 1
    assert dqflags.interpret_flags(None) == 0
    with pytest.raises(dqflags.DQError):
        dqflags.interpret_flags("NOT_A_FLAG")


def test_reference_dq_translated_through_dq_def() -> None:
    # the file uses bit 0 for HOT and bit 3 for DO_NOT_USE
    dq_def = [{"BIT": 0, "VALUE": 1, "NAME": "HOT"}, {"BIT": 3, "VALUE": 8, "NAME": "DO_NOT_USE"},
              {"BIT": 5, "VALUE": 32, "NAME": "SOMETHING_LOCAL"}, {"BIT": 20, "VALUE": 1 << 20, "NAME": "DEAD"}]
    dq = np.array([[1, 8, 9, 32, (1 << 20) | 1]], dtype=np.uint32)
    out = dqflags.translate_reference_dq(dq, dq_def)
    assert out.tolist() == [[dqflags.HOT, dqflags.DO_NOT_USE, dqflags.HOT | dqflags.DO_NOT_USE, 0,
                             dqflags.DEAD | dqflags.HOT]]


# -- FITS rows ------------------------------------------------------------------------------------
def _write(path: Path, data: np.ndarray, header: fits.Header | None = None) -> None:
    fits.HDUList([fits.PrimaryHDU(header=header), fits.ImageHDU(data, name="SCI")]).writeto(path)


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.float32, np.uint32, np.int32])
@pytest.mark.parametrize("ny", [7, 300])   # small blocks decode with numpy, large ones compiled
def test_row_reader_matches_astropy(tmp_path: Path, dtype: type, ny: int) -> None:
    rng = np.random.default_rng(1)
    data = rng.integers(-30000 if np.dtype(dtype).kind == "i" else 0, 60000, size=(2, 3, ny, 301)).astype(dtype)
    path = tmp_path / "x.fits"
    _write(path, data)
    with open_header(path) as hdul, RowReader(image_layout(hdul, "SCI", path)) as reader:
        assert np.array_equal(reader.read(2, 6), data[:, :, 2:6])
        assert np.array_equal(reader.read(0, ny), data)
        assert np.array_equal(reader.read(0, ny, dtype=np.float32), data.astype(np.float32))
        assert np.array_equal(reader.read(1, 3, x0=1, x1=4), data[:, :, 1:3, 1:4])
        # a wide column window of a big block: the compiled decoders on strided views
        assert np.array_equal(reader.read(0, ny, x0=4, x1=297), data[..., 4:297])
        assert np.array_equal(reader.read(0, ny, dtype=np.float32, x0=4, x1=297),
                              data[..., 4:297].astype(np.float32))


def test_truncated_file_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "t.fits"
    _write(path, np.zeros((1, 2, 64, 64), np.uint16))
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) - 5000)
    with pytest.raises(InputError, match="truncated"):
        with open_header(path) as hdul:
            image_layout(hdul, "SCI", path)


def test_file_truncated_while_mapped_is_an_input_error_not_a_bus_error(tmp_path: Path) -> None:
    path = tmp_path / "t.fits"
    data = np.arange(2 * 64 * 64, dtype=np.uint16).reshape(1, 2, 64, 64)
    _write(path, data)
    with open_header(path) as hdul, RowReader(image_layout(hdul, "SCI", path)) as reader:
        assert np.array_equal(reader.read(0, 8), data[..., :8, :])
        with open(path, "r+b") as fh:                  # rewritten in place under the reader
            fh.truncate(2880)
        with pytest.raises(InputError, match="truncated while being read"):
            reader.read(8, 64)


def test_non_fits_file_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "junk_uncal.fits"
    path.write_bytes(b"this is not FITS" * 100)
    with pytest.raises(InputError, match="not a readable FITS"):
        open_header(path)


def test_atomic_output_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.fits"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            Path(tmp).write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# -- exposure keywords ----------------------------------------------------------------------------
def _header(**overrides: object) -> fits.Header:
    cards = {"INSTRUME": "NIRCAM", "DETECTOR": "NRCA1", "EXP_TYPE": "NRC_IMAGE", "READPATT": "RAPID",
             "NINTS": 1, "NGROUPS": 4, "NFRAMES": 1, "GROUPGAP": 0, "TFRAME": 10.7, "TGROUP": 10.7,
             "DATE-OBS": "2023-01-01", "TIME-OBS": "00:00:00", "SUBARRAY": "SUB64P",
             "SUBSTRT1": 1, "SUBSTRT2": 1, "SUBSIZE1": 64, "SUBSIZE2": 64}
    cards.update(overrides)
    return fits.Header([(k, v) for k, v in cards.items() if v is not None])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8, np.int8, np.uint16, np.int16, np.uint32])
def test_write_hdulist_is_byte_identical_to_astropy(tmp_path: Path, dtype: type, monkeypatch) -> None:
    from calstream.steps import fitsio

    monkeypatch.setattr(fitsio, "WRITE_BLOCK_VALUES", 16)   # several blocks per array, a partial last one
    values = np.arange(3 * 5 * 7).reshape(3, 5, 7) * 977
    array = values.astype(dtype) if np.dtype(dtype).kind == "f" else (values % np.iinfo(dtype).max).astype(dtype)
    array.flat[0] = np.iinfo(dtype).max if np.dtype(dtype).kind in "ui" else -1.5
    if np.dtype(dtype).kind == "i":
        array.flat[1] = np.iinfo(dtype).min

    def hdul() -> fits.HDUList:
        return fits.HDUList([fits.PrimaryHDU(header=fits.Header([("TELESCOP", "JWST")])),
                             fits.ImageHDU(array, name="SCI"), fits.ImageHDU(array[0], name="ONE")])

    hdul().writeto(tmp_path / "astropy.fits")
    write_hdulist(hdul(), tmp_path / "ours.fits", fsync=False)
    assert (tmp_path / "ours.fits").read_bytes() == (tmp_path / "astropy.fits").read_bytes()
    assert np.array_equal(fits.getdata(tmp_path / "ours.fits", "SCI"), array)


def test_atomic_output_files_are_as_readable_as_plain_ones(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    with atomic_output(tmp_path / "product.fits") as tmp:
        Path(tmp).write_text("x")
    assert (tmp_path / "product.fits").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_exposure_requires_keywords_and_shapes() -> None:
    exp = exposure_from_header(_header(), "x", (1, 4, 64, 64))
    assert (exp.ngroups, exp.subsize1, exp.frmdivsr) == (4, 64, 1)
    with pytest.raises(InputError, match="TGROUP"):
        exposure_from_header(_header(TGROUP=None), "x", (1, 4, 64, 64))
    with pytest.raises(InputError, match="unknown instrument"):
        exposure_from_header(_header(INSTRUME="WFC3"), "x", (1, 4, 64, 64))
    with pytest.raises(InputError, match="4-D"):
        exposure_from_header(_header(), "x", (4, 64, 64))
    with pytest.raises(InputError, match="NGROUPS"):
        exposure_from_header(_header(), "x", (1, 5, 64, 64))
    with pytest.raises(InputError, match="SUBSIZE"):
        exposure_from_header(_header(), "x", (1, 4, 64, 32))


# -- parameters -----------------------------------------------------------------------------------
def test_parameter_layers_in_precedence_order() -> None:
    cli, top = parse_cli_overrides(["--steps.jump.rejection_threshold=7", "--steps.ipc.skip=true",
                                    "--save_calibrated_ramp=true"])
    assert top == {"save_calibrated_ramp": "true"}
    crds_layer = {"jump": {"rejection_threshold": 5.0, "flag_4_neighbors": False}}
    params = resolve(DETECTOR1_NIR, [("crds", crds_layer), ("cli", cli)])
    assert params["jump"]["rejection_threshold"] == 7.0
    assert params["jump"]["flag_4_neighbors"] is False
    assert params["ipc"]["skip"] is True
    assert params["persistence"]["skip"] is True   # jwst's code default
    assert params["dark_current"]["override_dark"] is None


def test_unknown_parameters_are_rejected() -> None:
    with pytest.raises(ParameterError, match="no parameter"):
        resolve(DETECTOR1_NIR, [("cli", {"jump": {"rejection_treshold": "5"}})])
    with pytest.raises(ParameterError, match="unknown step"):
        resolve(DETECTOR1_NIR, [("cli", {"jumpy": {"skip": "true"}})])
    with pytest.raises(ParameterError, match="true/false"):
        resolve(DETECTOR1_NIR, [("cli", {"ipc": {"skip": "maybe"}})])


# -- products -------------------------------------------------------------------------------------
def test_product_names_follow_jwst_conventions(tmp_path: Path) -> None:
    name = "jw01234001001_02101_00001-seg002_nrca1_uncal.fits"
    assert product_path(tmp_path, name, "rate").name == "jw01234001001_02101_00001-seg002_nrca1_rate.fits"
    assert product_path(tmp_path, "x_nrca1_ramp.fits", "jump").name == "x_nrca1_jump.fits"
    assert reference_keyword("saturation") == "R_SATURA"
    assert reference_keyword("readnoise") == "R_READNO"


def test_rate_product_opens_with_stdatamodels(tmp_path: Path) -> None:
    datamodels = pytest.importorskip("stdatamodels.jwst.datamodels")
    header = _header()
    prov = Provenance("jwst_0001.pmap", "14.0.3", {"gain": "crds://g.fits"}, {"S_JUMP": "COMPLETE"})
    arr = np.ones((64, 64), np.float32)
    path = write_rate(tmp_path / "x_rate.fits", header, prov, arr, np.zeros((64, 64), np.uint32),
                      arr, arr, arr, fsync=False)
    with datamodels.open(path) as model:
        assert type(model).__name__ == "ImageModel"
        model.validate()
        assert model.meta.ref_file.crds.context_used == "jwst_0001.pmap"
        assert model.meta.cal_step.jump == "COMPLETE"
        assert model.meta.ref_file.gain.name == "crds://g.fits"
    cube = write_rate(tmp_path / "x_rateints.fits", header, prov, arr[None], np.zeros((1, 64, 64), np.uint32),
                      arr[None], arr[None], arr[None], fsync=False)
    with datamodels.open(cube) as model:
        assert type(model).__name__ == "CubeModel"
        model.validate()


def test_crds_keyword_table_agrees_with_the_datamodel_schema() -> None:
    """data/fits_to_meta.json must map FITS keywords as crds' own schema lookup does."""
    locate = pytest.importorskip("crds.jwst.locate")
    from calstream.steps.exposure import _fits_to_meta

    table = _fits_to_meta()
    for keyword in ("INSTRUME", "DETECTOR", "FILTER", "PUPIL", "SUBARRAY", "EXP_TYPE", "READPATT",
                    "DATE-OBS", "TIME-OBS", "TSOVISIT", "LAMP", "CHANNEL", "MODULE", "NOUTPUTS", "BAND"):
        assert [table[keyword].lower()] == [p.lower() for p in locate.cached_dm_find_fits_keyword(keyword)], keyword
