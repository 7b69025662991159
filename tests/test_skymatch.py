"""skymatch: ImageStats statistics, overlap masks, and sky levels recovered from overlapping images."""

from __future__ import annotations

import numpy as np
import pytest

from calstream.steps.skymatch import (SkyMeasurement, SkyStats, bounding_polygon, clip_to_image, image_statistic,
                                      match_deltas, measure_image, polygon_area, read_skylist, sky_mask, solve_sky)
from test_resample import tan_wcs

SHAPE = (60, 60)
SKIES = (1.0, 1.5, 2.3)
SHIFTS = ((0.0, 0.0), (15.0, 5.0), (-10.0, 12.0))


def test_statistics_known_answers():
    rng = np.random.default_rng(3)
    data = rng.normal(5.0, 0.5, 200_000).astype(np.float32)
    data[:2000] = 500.0                                 # 1% bright "sources", clipped away
    mean, n = image_statistic(data, SkyStats("mean", nclip=5))
    assert mean == pytest.approx(5.0, abs=0.01) and n < data.size - 1900
    assert image_statistic(data, SkyStats("median"))[0] == pytest.approx(5.0, abs=0.01)
    assert image_statistic(data, SkyStats("mode"))[0] == pytest.approx(5.0, abs=0.05)
    assert image_statistic(data, SkyStats("midpt"))[0] == pytest.approx(5.0, abs=0.05)
    assert image_statistic(np.array([1.0, 2.0, 3.0], np.float32), SkyStats("mean", nclip=0)) == (2.0, 3)
    assert image_statistic(data, SkyStats("mean", nclip=0, lower=4.0, upper=6.0))[0] == pytest.approx(5.0, abs=0.01)
    with pytest.raises(ValueError):
        image_statistic(np.array([], np.float32), SkyStats())
    with pytest.raises(ValueError):
        SkyStats("average")


@pytest.mark.parity
def test_statistics_identical_to_imagestats():
    imagestats = pytest.importorskip("stsci.imagestats")
    import contextlib
    import io

    rng = np.random.default_rng(11)
    for k in range(60):
        n = int(rng.integers(2, 3000))
        data = rng.normal(rng.normal(), rng.uniform(0.1, 3.0), n).astype(np.float32)
        data[rng.random(n) < 0.05] += 40.0
        for stat in ("mode", "median", "midpt", "mean"):
            stats = SkyStats(stat, nclip=k % 6)
            with contextlib.redirect_stdout(io.StringIO()):
                ref = imagestats.ImageStats(data, fields=f"npix,{stat}", nclip=stats.nclip, lsig=4.0, usig=4.0,
                                            binwidth=0.1)
            assert image_statistic(data, stats) == (getattr(ref, stat), ref.npix)


def test_overlap_polygon_and_mask():
    a, b = tan_wcs(SHAPE), tan_wcs(SHAPE, shift=(20.0, 0.0))     # b covers a's columns 0..39
    ra, dec = bounding_polygon(b, SHAPE)
    x, y = a.invert(ra, dec, with_bounding_box=False)
    clipped = clip_to_image(x, y, SHAPE)
    assert polygon_area(clipped) == pytest.approx(40.0 * 60.0, rel=1e-3)
    sci = np.ones(SHAPE, np.float32)
    sci[:, 42:] = 100.0                                       # well outside the overlap
    m = measure_image(sci, np.ones(SHAPE, bool), a, {1: [(ra, dec)]}, SkyStats("mean", nclip=0))
    assert m.overlaps[1] == (1.0, pytest.approx(40 * 60, abs=120))
    assert m.full[0] > 1.0
    far = tan_wcs(SHAPE, shift=(200.0, 0.0))
    none = measure_image(sci, np.ones(SHAPE, bool), a, {1: [bounding_polygon(far, SHAPE)]}, SkyStats())
    assert none.overlaps == {}


@pytest.fixture(scope="module")
def sky_images():
    """Three overlapping images with different skies, noise and a few bright sources."""
    rng = np.random.default_rng(5)
    out = []
    for sky, shift in zip(SKIES, SHIFTS):
        sci = (sky + rng.normal(0.0, 0.05, SHAPE)).astype(np.float32)
        sci[rng.integers(0, 60, 30), rng.integers(0, 60, 30)] += 50.0
        dq = np.zeros(SHAPE, np.uint32)
        sci[0, 0], dq[0, 0] = 1e6, 1                          # DO_NOT_USE: ignored
        out.append((sci, dq, tan_wcs(SHAPE, shift=shift)))
    return out


def _measure(images, stats=SkyStats(), whole=True, groups=None):
    groups = groups or list(range(len(images)))
    polys = [bounding_polygon(w, SHAPE) for _, _, w in images]
    result = []
    for i, (sci, dq, w) in enumerate(images):
        others: dict[int, list] = {}
        for j, poly in enumerate(polys):
            if groups[j] != groups[i]:
                others.setdefault(groups[j], []).append(poly)
        result.append(measure_image(sci, sky_mask(sci, dq), w, others, stats, whole_image=whole))
    return result


@pytest.mark.parametrize("method, expected", [
    ("match", [s - SKIES[0] for s in SKIES]),
    ("global+match", list(SKIES)),
    ("local", list(SKIES)),
    ("global", [SKIES[0]] * 3),
])
def test_sky_levels_recovered(sky_images, method, expected):
    solution = solve_sky(_measure(sky_images, whole=method != "match"), skymethod=method)
    assert solution.valid == [True, True, True]
    np.testing.assert_allclose(solution.levels, expected, atol=0.02)   # mode of 0.05-sigma noise


def test_match_up_groups_and_unmatched_images(sky_images):
    up = solve_sky(_measure(sky_images, whole=False), skymethod="match", match_down=False)
    np.testing.assert_allclose(up.levels, [s - SKIES[2] for s in SKIES], atol=0.02)
    # images 1 and 2 in one group: one level for both, matched against image 0
    grouped = solve_sky(_measure(sky_images, whole=False, groups=[0, 1, 1]), skymethod="match", groups=[0, 1, 1])
    assert grouped.levels[1] == grouped.levels[2] and grouped.levels[0] == 0.0
    assert grouped.levels[1] == pytest.approx(np.mean(SKIES[1:]) - SKIES[0], abs=0.3)
    # an image overlapping nobody cannot be matched
    lonely = [SkyMeasurement((1.0, 10), {1: (1.0, 10)}), SkyMeasurement((2.0, 10), {0: (2.5, 10)}),
              SkyMeasurement((3.0, 10), {})]
    solution = solve_sky(lonely, skymethod="match")
    assert solution.valid == [True, True, False]
    assert solution.levels[:2] == pytest.approx([0.0, 1.5])
    assert np.isnan(match_deltas({}, 2)).all()


def test_read_skylist(tmp_path):
    path = tmp_path / "sky.txt"
    path.write_text("# file sky\na_cal.fits 1.5\nb_cal.fits 2.0\n")
    assert read_skylist(path, ["b_crf.fits", "a_cal.fits"]) == [2.0, 1.5]
    with pytest.raises(ValueError):
        read_skylist(path, ["a_cal.fits", "c_cal.fits"])
