"""calwebb_image3 against the truth of a synthetic dithered field (SUB640, 4 exposures).

One module-scoped field: generated, run through calwebb_detector1 and calwebb_image2, then
calwebb_image3. Checks (issue 4): residual alignment < 0.02 arcsec, catalog positions within
0.05 arcsec, isolated-star fluxes, cosmic rays that survived stage 1 flagged and absent from the
mosaic, total flux within 0.5%.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.table import Table

from calstream.steps.asn import load_association
from calstream.steps.tweakreg import align_wcs, detect_sources


@pytest.fixture(scope="module")
def field(crds_cache, tmp_path_factory):
    """The field (FieldInfo) with every exposure calibrated to cal next to its association."""
    from calstream.steps.detector1 import calibrate_file
    from calstream.steps.image2 import calibrate_rate_file
    from calstream.steps.synth.field import generate_field

    out = tmp_path_factory.mktemp("field")
    info = generate_field(out, crds_cache.root, subarray="SUB640", n_exposures=4, seed=1, via_datamodels=False)
    for uncal in info.uncal_paths:
        rate = calibrate_file(uncal, out, fsync=False).products["rate"]
        calibrate_rate_file(rate, out)
    return info


@pytest.fixture(scope="module")
def cal_models(field):
    from stdatamodels.jwst import datamodels

    models = [datamodels.open(p) for p in field.cal_paths]
    yield models
    for m in models:
        m.close()


@pytest.fixture(scope="module")
def catalogs(cal_models):
    """tweakreg source catalogs of the cal exposures."""
    return [detect_sources(m.data, m.err, m.dq) for m in cal_models]


@pytest.fixture(scope="module")
def image3(field, tmp_path_factory):
    from calstream.steps.image3 import calibrate_association
    from calstream.steps.synth.field_truth import evaluate_image3

    result = calibrate_association(field.asn_path, tmp_path_factory.mktemp("image3"))
    return result, evaluate_image3(field.truth_path, result.products, field.crds_root)


def _max_offset_arcsec(wcs_a, wcs_b, shape=(640, 640), step=40) -> float:
    yy, xx = np.mgrid[0:shape[0]:step, 0:shape[1]:step].astype(float)
    ra_a, dec_a = wcs_a(xx, yy, with_bounding_box=False)
    ra_b, dec_b = wcs_b(xx, yy, with_bounding_box=False)
    cosd = math.cos(math.radians(float(np.mean(dec_a))))
    return float(np.max(np.hypot((ra_a - ra_b) * cosd, dec_a - dec_b)) * 3600.0)


def test_field_products(field):
    asn = load_association(field.asn_path)
    assert [p.name for p in asn.member_paths()] == [p.name for p in field.cal_paths]
    assert all(p.is_file() for p in field.cal_paths)
    assert field.exposures[0].error_arcsec == (0.0, 0.0, 0.0)
    assert all(0.05 < math.hypot(*e.error_arcsec[:2]) < 0.3 for e in field.exposures[1:])
    assert [bool(e.surviving_crs) for e in field.exposures] == [False, False, True, True]
    assert sum(r["isolated"] and r["kind"] == "star" for r in field.sources) >= 10
    assert Table.read(field.refcat_path).colnames == ["RA", "DEC", "id"]


def test_truth_matches_stage2_of_the_exact_exposure(field, cal_models):
    """Exposure 1's header pointing is the true one: image2's WCS puts the stars at their true
    positions, and their calibrated fluxes match the truth's expected DN/s."""
    model = cal_models[0]
    assert _max_offset_arcsec(model.meta.wcs, field.true_wcs[0]) < 1e-4
    ratios = []
    yy, xx = np.mgrid[0:640, 0:640]
    for s in field.sources:
        if s["kind"] != "star" or not s["isolated"] or s["expected_dn_s"][0] is None:
            continue
        x, y = model.meta.wcs.invert(s["ra"], s["dec"])
        r = np.hypot(xx - x, yy - y)
        good = (model.dq & 1) == 0
        if not good[r < 8].all():
            continue
        sky = np.median(model.data[(r > 12) & (r < 20) & good])
        ratios.append((model.data[r < 8] - sky).sum() / _photmjsr(field) / s["expected_dn_s"][0])
    assert len(ratios) >= 8
    assert np.median(ratios) == pytest.approx(1.0, abs=0.01)


def _photmjsr(field) -> float:
    import json

    return json.loads(field.truth_path.read_text())["photmjsr"]


def test_tweakreg_functions_remove_the_pointing_errors(field, cal_models, catalogs):
    assert all(len(c) >= 15 for c in catalogs)
    result = align_wcs([m.meta.wcs for m in cal_models], catalogs)
    assert [a.status for a in result] == ["REFERENCE", "SUCCESS", "SUCCESS", "SUCCESS"]
    for a, e, truth in zip(result, field.exposures, field.true_wcs):
        assert _max_offset_arcsec(a.wcs, truth) < 0.02
        # the correction undoes the pointing error: header + shift = true
        assert a.shift_arcsec == pytest.approx(e.error_arcsec[:2], abs=0.01)


def test_absolute_refcat_removes_an_error_common_to_all_exposures(field, cal_models, catalogs):
    from calstream.steps.image2 import Pointing, imaging_wcs, read_distortion, read_filter_offset
    from calstream.steps.synth.detector import subarray_for
    from calstream.steps.synth.stage2 import stage2_name
    from calstream.steps.tweakreg import wcsinfo_from_gwcs

    refdir = field.crds_root / "references" / "jwst" / "nircam"
    distortion = read_distortion(str(refdir / stage2_name("distortion", field.detector)))
    offset = read_filter_offset(str(refdir / stage2_name("filteroffset", field.detector)), field.filter, "CLEAR")
    sub = subarray_for(field.detector, field.subarray)
    shifted = []
    for m in cal_models:          # every header off by the same extra 0.3 arcsec in Dec
        info = wcsinfo_from_gwcs(m.meta.wcs)
        w = m.meta.wcsinfo
        shifted.append(imaging_wcs(Pointing(w.ra_ref, w.dec_ref + 0.3 / 3600.0, w.roll_ref, info["v2_ref"],
                                            info["v3_ref"], 1.0), distortion, sub.xstart, sub.ystart, sub.xsize, sub.ysize,
                                    offset))
    assert _max_offset_arcsec(shifted[0], field.true_wcs[0]) > 0.29
    absolute = align_wcs(shifted, catalogs, abs_refcat=Table.read(field.refcat_path))
    assert all(a.status == "SUCCESS" for a in absolute)
    for a, truth in zip(absolute, field.true_wcs):
        assert _max_offset_arcsec(a.wcs, truth) < 0.02


def test_image3_products(image3):
    result, _ = image3
    assert {"i2d", "cat", "segm"} <= set(result.products)
    assert sum(k.startswith("crf:") for k in result.products) == 4
    assert all(v == "COMPLETE" for k, v in result.status.items() if k != "assign_mtwcs")


def test_image3_alignment_and_positions(image3):
    _, truth = image3
    assert truth.tweak_status == ["COMPLETE"] * 4
    assert max(truth.alignment_arcsec) < 0.02
    assert truth.n_unmatched_isolated == 0 and len(truth.position_arcsec_isolated) >= 12
    assert max(truth.position_arcsec_isolated) < 0.05


def test_image3_isolated_star_fluxes(image3):
    """Isolated stars measured to SNR >= 200 (0.5% noise): every one within the issue's 2% of the
    truth, the median within 0.5%. Two choices carry this on these undersampled SW stars (measured
    on fields of seeds 1-3, README): ivm-smed weights (jwst's per-pixel ivm spreads these stars by
    ~1% rms, up to 2.1%) and CRDS's pars-outlierdetectionstep (jwst's scale 1.2 0.7 flags the
    cores of well-centred stars: up to 6% low)."""
    from calstream.steps.synth.field_truth import MAX_STAR_FLUX_ERROR

    _, truth = image3
    ratios = np.asarray(truth.star_flux_ratio_isophotal)[np.asarray(truth.star_flux_snr) >= 200]
    assert len(ratios) >= 8
    assert abs(np.median(ratios) - 1.0) < 0.005
    assert np.max(np.abs(ratios - 1.0)) < MAX_STAR_FLUX_ERROR


def test_image3_surviving_cosmic_rays_are_flagged_and_gone(image3):
    _, truth = image3
    assert truth.n_cr_tested >= 100
    sky_tested = truth.n_cr_tested - truth.n_cr_on_source_tested
    assert sky_tested >= 100 and truth.n_cr_flagged - truth.n_cr_on_source_flagged == sky_tested
    assert truth.n_cr_on_source_tested >= 30
    assert truth.n_cr_on_source_flagged >= 0.95 * truth.n_cr_on_source_tested
    assert truth.n_cr_sky_tested >= 30 and truth.cr_leak_median_sigma > 3   # a leak would show
    assert truth.cr_residual_fraction < 0.1
    assert truth.cr_max_residual_sigma < 5
    assert all(passed for passed in (v[2] for v in truth.criteria().values()))


def test_image3_total_flux_is_conserved(image3):
    _, truth = image3
    assert truth.n_sources_in_total >= 25
    assert abs(truth.total_flux_ratio - 1.0) < 0.005
