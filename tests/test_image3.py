"""calwebb_image3 end to end on a calibrated synthetic field: products as stdatamodels reads them,
the CLI, parameters and bad inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from astropy.io import fits

from calstream.steps import dqflags
from calstream.steps.asn import asn_from_list, write_association
from calstream.steps.errors import InputError, ParameterError, StepNotImplementedError
from calstream.steps.image3 import calibrate_association, crf_name

OUTLIER = int(dqflags.OUTLIER)
FAST = {"tweakreg": {"skip": True}, "source_catalog": {"skip": True}}


@pytest.fixture(scope="module")
def image3_run(image3_field, tmp_path_factory):
    out = tmp_path_factory.mktemp("image3")
    return calibrate_association(image3_field.asn_path, out, context=image3_field.context)


def test_steps_and_products(image3_field, image3_run):
    r = image3_run
    assert r.status["assign_mtwcs"] == "SKIPPED"
    for step in ("skymatch", "outlier_detection", "resample", "source_catalog"):
        assert r.status[step] == "COMPLETE", step
    assert r.status["tweakreg"] in ("COMPLETE", "SKIPPED")      # a 160x160 field may hold too few stars
    names = {p.name for p in r.products.values()}
    assert {"synth_field_i2d.fits", "synth_field_cat.ecsv", "synth_field_segm.fits"} <= names
    crfs = [k for k in r.products if k.startswith("crf:")]
    assert len(crfs) == len(image3_field.cal_paths)
    left = {p.name for p in r.products["i2d"].parent.iterdir()}
    assert left == {p.name for p in r.products.values()}           # no temporaries left behind


def test_i2d_product(image3_field, image3_run):
    from gwcs import FITSImagingWCSTransform
    from stdatamodels.jwst import datamodels

    path = image3_run.products["i2d"]
    with datamodels.open(path) as model:
        assert type(model).__name__ == "ImageModel"
        model.validate()
        shape = model.data.shape
        for name in ("err", "wht", "var_rnoise", "var_poisson", "var_flat"):
            assert getattr(model, name).shape == shape, name
        assert model.con.shape == (1,) + shape and model.con.max() <= 0b1111
        good = np.isfinite(model.data)
        assert good.mean() > 0.8
        assert np.all(model.wht[good] > 0) and np.all(np.isfinite(model.err[good]))
        assert np.all(model.con[0][good] > 0)
        assert isinstance(model.meta.wcs.forward_transform, FITSImagingWCSTransform)
        assert model.meta.resample.pointings == 4
        assert model.meta.bunit_data == "MJy/sr"
        assert model.meta.photometry.pixelarea_steradians > 0
        assert model.meta.filename == path.name
        # the FITS WCS in the header describes the same grid as the gwcs
        ra, dec = model.meta.wcs(10.0, 20.0)
        from astropy.wcs import WCS
        fra, fdec = WCS(fits.getheader(path, "SCI")).all_pix2world(10.0, 20.0, 0)
        assert abs(ra - fra) * 3600 < 1e-4 and abs(dec - fdec) * 3600 < 1e-4
    header = fits.getheader(path)
    assert header["CAL_VER"] and header["CRDS_CTX"] == image3_field.context
    assert header["S_RESAMP"] == "COMPLETE" and header["S_OUTLIR"] == "COMPLETE" and header["S_SKYMAT"] == "COMPLETE"
    assert header["RESWHT"] == "ivm" and header["CSRESWHT"] == "ivm-smed"     # jwst's word, calstream's choice
    table = fits.getdata(path, "HDRTAB")
    assert [n.strip() for n in table["FILENAME"]] == [crf_name(p.name, "a3001") for p in image3_field.cal_paths]
    assert np.isclose(fits.getheader(path)["EFFEXPTM"], sum(
        fits.getheader(p, "SCI")["XPOSURE"] for p in image3_field.cal_paths))


def test_undersampled_filters_take_crds_outlier_parameters(image3_field):
    """The synthetic CRDS selects pars-outlierdetectionstep by EXP_TYPE/FILTER/PUPIL (as real NIRCam
    rmaps do) for undersampled filters; other filters keep jwst's defaults."""
    from calstream.steps.asn import load_association
    from calstream.steps.image3 import open_members, plan_image3
    from calstream.steps.synth.references import UNDERSAMPLED_FILTERS

    members = open_members(load_association(image3_field.asn_path))
    assert members[0].info.keyword("FILTER") in UNDERSAMPLED_FILTERS
    plan = plan_image3(members, context=image3_field.context)
    assert plan.params["outlier_detection"]["scale"] == "2.5 1.2"
    assert any("pars-outlierdetectionstep" in source for source in plan.parameter_sources)
    assert plan.params["outlier_detection"]["snr"] == "5.0 4.0"
    members[0].info.primary["FILTER"] = "F444W"
    assert plan_image3(members, context=image3_field.context).params["outlier_detection"]["scale"] == "1.2 0.7"


@pytest.mark.parametrize(("steps", "problem"), [
    ({"resample": {"weight_type": "IVM"}}, "resample.weight_type='IVM'"),
    ({"outlier_detection": {"kernel": "box"}}, "outlier_detection.kernel='box'"),
    ({"resample": {"pixfrac": 0.0}}, "resample.pixfrac=0.0"),
    ({"outlier_detection": {"snr": "5"}}, "outlier_detection.snr must have two values"),
    ({"resample": {"output_shape": "10 20 30"}}, "resample.output_shape must have two values"),
])
def test_bad_parameters_are_refused_before_anything_runs(image3_field, steps, problem):
    from calstream.steps.asn import load_association
    from calstream.steps.image3 import open_members, plan_image3

    members = open_members(load_association(image3_field.asn_path))
    with pytest.raises(ParameterError, match=problem.replace("(", r"\(").replace(".", r"\.")):
        plan_image3(members, cli_steps=steps, context=image3_field.context)


def test_crf_products(image3_run):
    from stdatamodels.jwst import datamodels

    for member in image3_run.members:
        path = image3_run.products[f"crf:{member['product']}"]
        with datamodels.open(path) as model:
            model.validate()
            assert model.meta.cal_step.outlier_detection == "COMPLETE"
            assert model.meta.cal_step.skymatch == member["status"]["skymatch"]
            if member["status"]["skymatch"] == "COMPLETE":
                assert model.meta.background.level == pytest.approx(member["sky_level"])
                assert model.meta.background.subtracted is False
            flagged = (model.dq & OUTLIER) != 0
            assert flagged.sum() == member["outliers"]
            assert np.all(np.isnan(model.data[flagged]))
            assert model.meta.filename == path.name


def test_catalog_and_segmentation(image3_run):
    from astropy.table import Table
    from stdatamodels.jwst import datamodels

    cat = Table.read(image3_run.products["cat"], format="ascii.ecsv")
    assert len(cat) >= 1          # a 160x160 mosaic of 0.3-0.6 s exposures: few sources clear 3 sigma
    assert {"label", "sky_centroid", "isophotal_flux", "aper_total_abmag"} <= set(cat.colnames)
    with datamodels.open(image3_run.products["segm"]) as segm, datamodels.open(image3_run.products["i2d"]) as i2d:
        assert type(segm).__name__ == "SegmentationMapModel"
        assert segm.data.shape == i2d.data.shape
        assert segm.data.max() == len(cat)


def test_cosmic_rays_absent_from_the_mosaic(image3_field, image3_run):
    """A bright surviving cosmic ray seen by all four exposures leaves no trace in the i2d."""
    from stdatamodels.jwst import datamodels

    truth = json.loads(image3_field.truth_path.read_text())
    with datamodels.open(image3_run.products["i2d"]) as i2d:
        crs = [c for e in truth["exposures"] for c in e["surviving_crs"] if c["snr"] > 20 and not c["do_not_use"]]
        x, y = i2d.meta.wcs.invert(np.array([c["ra"] for c in crs]), np.array([c["dec"] for c in crs]))
        full = i2d.con[0] == 0b1111
        data = np.where(np.isfinite(i2d.data), i2d.data, np.nan)
        bg = np.nanmedian(data[full])
        noise = 1.4826 * np.nanmedian(np.abs(data[full] - bg))
        checked = 0
        for cx, cy, c in zip(x, y, crs):
            ix, iy = int(round(cx)), int(round(cy))
            if not (2 <= ix < data.shape[1] - 2 and 2 <= iy < data.shape[0] - 2) or not full[iy, ix]:
                continue
            excess_mjysr = c["excess_dn_s"] * truth["photmjsr"]
            assert data[iy, ix] - bg < 0.2 * excess_mjysr + 8 * noise, c
            checked += 1
        assert checked >= 3


def test_cli_run_with_a_parameter_file(image3_field, tmp_path, capsys):
    from calstream.daemon.cli import main

    config = tmp_path / "pars.toml"
    config.write_text("[steps.resample]\npixfrac = 0.8\n[steps.source_catalog]\nskip = true\n")
    rc = main(["run", "calwebb_image3", str(image3_field.asn_path), "--output-dir", str(tmp_path / "out"),
               "--crds-context", image3_field.context, "--config", str(config), "--steps.tweakreg.skip=true"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "synth_field_i2d.fits" in printed and "skipped:" in printed
    header = fits.getheader(tmp_path / "out" / "synth_field_i2d.fits")
    assert header["PIXFRAC"] == 0.8 and header["S_TWKREG"] == "SKIPPED"
    rc = main(["run", "calwebb_image3", str(tmp_path / "missing_asn.json"), "--output-dir", str(tmp_path)])
    assert rc == 3


def _asn(tmp_path, files, name="bad"):
    return write_association(asn_from_list([str(f) for f in files], name), tmp_path / f"{name}_asn.json")


def test_bad_inputs(image3_field, tmp_path):
    cals = image3_field.cal_paths
    with pytest.raises(InputError, match="nope_cal.fits.*does not exist"):
        calibrate_association(_asn(tmp_path, [cals[0], tmp_path / "nope_cal.fits"]), tmp_path,
                              context=image3_field.context)
    other = tmp_path / "other_cal.fits"
    shutil.copy(cals[1], other)
    fits.setval(other, "FILTER", value="F150W")
    with pytest.raises(InputError, match="FILTER=F150W"):
        calibrate_association(_asn(tmp_path, [cals[0], other]), tmp_path, context=image3_field.context)
    empty = asn_from_list([str(cals[0])], "bg")
    empty["products"][0]["members"][0]["exptype"] = "background"
    with pytest.raises(InputError, match="no science members"):
        calibrate_association(write_association(empty, tmp_path / "bg_asn.json"), tmp_path,
                              context=image3_field.context)
    with pytest.raises(InputError, match="not a calibrated image|SCI"):
        bad = tmp_path / "bad_cal.fits"
        fits.HDUList([fits.PrimaryHDU()]).writeto(bad)
        calibrate_association(_asn(tmp_path, [bad]), tmp_path, context=image3_field.context)
    no_var = tmp_path / "novar_cal.fits"
    with fits.open(cals[1]) as hdul:
        fits.HDUList([h for h in hdul if h.name != "VAR_RNOISE"]).writeto(no_var)
    with pytest.raises(InputError, match="novar_cal.fits.*no VAR_RNOISE extension"):
        calibrate_association(_asn(tmp_path, [cals[0], no_var]), tmp_path / "novar", context=image3_field.context)
    with pytest.raises(StepNotImplementedError, match="single"):
        calibrate_association(image3_field.asn_path, tmp_path, cli_steps={"resample": {"single": True}},
                              context=image3_field.context)
    with pytest.raises(ParameterError):
        calibrate_association(image3_field.asn_path, tmp_path, cli_steps={"resample": {"pixfracc": 0.5}},
                              context=image3_field.context)


def test_single_exposure_and_custom_grid(image3_field, tmp_path):
    asn = _asn(tmp_path, [image3_field.cal_paths[0]], "single")
    steps = dict(FAST, resample={"rotation": 0.0, "pixel_scale": 0.05, "output_shape": "120,100"})
    r = calibrate_association(asn, tmp_path / "out", cli_steps=steps, context=image3_field.context)
    assert r.status["outlier_detection"] == "SKIPPED" and r.status["resample"] == "COMPLETE"
    assert r.status["skymatch"] == "SKIPPED"                      # match needs overlapping images
    assert not any(k.startswith("crf:") for k in r.products)
    from stdatamodels.jwst import datamodels

    with datamodels.open(r.products["i2d"]) as i2d:
        assert i2d.data.shape == (100, 120)                        # output_shape is (nx, ny)
        assert i2d.meta.wcsinfo.cdelt1 * 3600 == pytest.approx(0.05)
        np.testing.assert_allclose([[i2d.meta.wcsinfo.pc1_1, i2d.meta.wcsinfo.pc1_2],
                                    [i2d.meta.wcsinfo.pc2_1, i2d.meta.wcsinfo.pc2_2]], [[-1, 0], [0, 1]], atol=1e-12)


def test_image2_resample_writes_an_i2d(image3_field, tmp_path):
    """calwebb_image2's resample step (off by default, as calstream's image2 default): the exposure
    drizzled onto its own grid as <name>_i2d.fits."""
    from stdatamodels.jwst import datamodels

    from calstream.steps.image2 import calibrate_rate_file

    rate = image3_field.cal_paths[0].with_name(image3_field.cal_paths[0].name.replace("_cal.fits", "_rate.fits"))
    result = calibrate_rate_file(rate, tmp_path, cli_steps={"resample": {"skip": False}},
                                 context=image3_field.context)
    assert result.status["resample"] == "COMPLETE"
    assert result.products["i2d"].name == rate.name.replace("_rate.fits", "_i2d.fits")
    with datamodels.open(result.products["i2d"]) as i2d, datamodels.open(result.products["cal"]) as cal:
        i2d.validate()
        assert i2d.meta.resample.pointings == 1 and i2d.meta.cal_step.resample == "COMPLETE"
        assert i2d.meta.filename == result.products["i2d"].name
        covered = np.isfinite(i2d.data) & (i2d.con[0] == 1)
        assert covered.sum() > 0.9 * cal.data.size
        assert np.nanmedian(i2d.data[covered]) == pytest.approx(np.nanmedian(cal.data), abs=0.3)
        assert i2d.meta.exposure.exposure_time == cal.meta.exposure.exposure_time
