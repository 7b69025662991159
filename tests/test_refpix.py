"""Tests of the streaming reference-pixel correction (steps/refpix.py)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from calstream.steps import dqflags as F
from calstream.steps import refpix as R

N = 2048
DNU, REF = F.DO_NOT_USE, F.REFERENCE_PIXEL
FULL = R.RefpixGeometry()  # NIRCam-like: FASTAXIS=1, SLOWAXIS=2, 4 outputs


def ramp(shape, seed=0):
    """Bias-like ramp with row and column noise and a few hot pixels, DMS orientation."""
    rng = np.random.default_rng(seed)
    nints, ngroups, ny, nx = shape
    d = rng.normal(100, 10, shape).astype(np.float32)
    d += rng.normal(0, 5, (nints, ngroups, 1, nx)).astype(np.float32)
    d += rng.normal(0, 5, (nints, ngroups, ny, 1)).astype(np.float32)
    d[rng.random(shape) < 0.002] += 500
    pdq = np.zeros((ny, nx), np.uint32)
    pdq[rng.random((ny, nx)) < 0.01] |= DNU
    return d, pdq


def flag_ref(pdq, geom):
    """REFERENCE_PIXEL where the mask has it: the 4-pixel border of the full detector."""
    ny, nx = pdq.shape
    r0, c0 = geom.offsets(ny, nx)
    yy = np.arange(ny)[:, None] + r0
    xx = np.arange(nx)[None, :] + c0
    pdq[(yy < 4) | (yy >= N - 4) | (xx < 4) | (xx >= N - 4)] |= REF
    return pdq


def streamed(data, pdq, geom, chunk=100, **kw):
    """Collect the border chunk by chunk, measure once, apply chunk by chunk."""
    nints, ngroups, ny, nx = data.shape
    border = R.RefBorder.empty((nints, ngroups), ny, nx, np.float32)
    dq_border = R.RefBorder.empty((), ny, nx, np.uint32)
    for r0 in range(0, ny, chunk):
        border.fill(data[:, :, r0:r0 + chunk], r0)
        dq_border.fill(pdq[r0:r0 + chunk], r0)
    plan = R.measure_refpix(border, dq_border, geom, **kw)
    out = data.copy()
    for r0 in range(0, ny, chunk):
        c = out[:, :, r0:r0 + chunk].copy()
        R.apply_refpix(c, plan, r0)
        out[:, :, r0:r0 + chunk] = c
    return out, plan


# ----------------------------------------------------------------------------- known answers
def tb_value(amp, parity):
    return 10.0 * amp + parity + 1.0


def known_full_frame():
    """Constant top/bottom refs per output/parity, side refs = that + 5, science = 100."""
    d = np.full((1, 1, N, N), 100.0, np.float32)
    f = np.arange(N)
    tb = np.array([tb_value(a, p) for a, p in zip(f // 512, f % 2)], np.float32)
    d[0, 0, :4, :] = tb
    d[0, 0, -4:, :] = tb
    d[0, 0, 4:-4, :4] = tb[:4] + 5.0
    d[0, 0, 4:-4, -4:] = tb[-4:] + 5.0
    return d, np.zeros((N, N), np.uint32)


def test_full_frame_known_answer():
    d, pdq = known_full_frame()
    out, plan = streamed(d, pdq, FULL, chunk=300)
    assert plan.algorithm == "fullframe" and plan.status == "COMPLETE"
    for a in range(4):
        for p in range(2):
            assert plan.tb[0, 0, a, p] == tb_value(a, p)
    assert plan.side[0, 0, 1000] == 5.0 and plan.side[0, 0, 0] == 0.0
    x = np.array([4, 5, 600, 601, 1500, 2043])
    expect = 100.0 - np.array([tb_value(a, p) for a, p in zip(x // 512, x % 2)]) - 5.0
    assert np.array_equal(out[0, 0, 1000, x], expect.astype(np.float32))
    # side rows near the ends see the (corrected to 0) corner reference pixels
    assert out[0, 0, 0, 600] == 0.0


def test_bad_reference_pixels_are_ignored():
    d, pdq = known_full_frame()
    d[0, 0, 1, 10] = 1e6
    pdq[1, 10] = DNU
    d[0, 0, 700, 1] = -1e6
    pdq[700, 1] = DNU
    out, _ = streamed(d, pdq, FULL)
    ref, _ = streamed(*known_full_frame(), FULL)
    keep = np.ones((N, N), bool)
    keep[1, 10] = keep[700, 1] = False
    assert np.array_equal(out[0, 0][keep], ref[0, 0][keep])


def test_output_without_reference_pixels_is_not_corrected():
    d, pdq = known_full_frame()
    pdq[:4, 512:1024] = DNU
    pdq[-4:, 512:1024] = DNU
    out, plan = streamed(d, pdq, FULL, use_side_ref_pixels=False)
    assert np.all(out[0, 0, 10, 512:1024] == 100.0)
    assert out[0, 0, 10, 4] == 100.0 - tb_value(0, 0)


def test_single_output_subarray_known_answer():
    geom = R.RefpixGeometry(1, 1, 64, 64, 1, 2, 1, "SUB64")
    d = np.full((1, 2, 64, 64), 50.0, np.float32)
    pdq = flag_ref(np.zeros((64, 64), np.uint32), geom)
    refs = (pdq & REF) != 0
    cols = np.broadcast_to(np.arange(64) % 2 == 0, (64, 64))
    d[0, :, refs & cols] = 3.0
    d[0, :, refs & ~cols] = 7.0
    out, plan = streamed(d, pdq, geom, chunk=10)
    assert plan.algorithm == "subarray" and plan.n_refpix == int(refs.sum())
    assert np.all(out[0, :, 30, 30] == 47.0) and np.all(out[0, :, 30, 31] == 43.0)


def test_subarray_without_reference_pixels_and_not_fitting():
    d, pdq = ramp((1, 2, 64, 64))
    out, plan = streamed(d, pdq, R.RefpixGeometry(500, 500, 64, 64, 1, 2, 1, "SUB64"))
    assert plan.status == "COMPLETE" and not plan.active and np.array_equal(out, d)
    out, plan = streamed(d, pdq, R.RefpixGeometry(2000, 1, 64, 64, 1, 2, 1, "SUB64"))
    assert plan.status == "SKIPPED" and np.array_equal(out, d)


def test_border_fill_equals_from_array():
    d, _ = ramp((2, 2, 37, 23), seed=3)
    whole = R.RefBorder.from_array(d)
    parts = R.RefBorder.empty((2, 2), 37, 23, np.float32)
    for r0 in range(0, 37, 5):
        parts.fill(d[:, :, r0:r0 + 5], r0)
    for name in ("bottom", "top", "left", "right"):
        assert np.array_equal(getattr(whole, name), getattr(parts, name))
    assert np.array_equal(whole.gather(np.array([0, 36, 20, 20]), np.array([5, 5, 0, 22])),
                          d[..., [0, 36, 20, 20], [5, 5, 0, 22]])


# ----------------------------------------------------------------------------- chunks == whole
GEOMS = {
    "full_nircam": ((1, 2, N, N), R.RefpixGeometry(1, 1, N, N, -1, 2, 4, "FULL")),
    "full_niriss": ((1, 2, N, N), R.RefpixGeometry(1, 1, N, N, -2, -1, 4, "FULL")),
    "stripe_4out": ((2, 2, 64, N), R.RefpixGeometry(1, 1, N, 64, -1, 2, 4, "SUBGRISM64")),
    "interior_4out": ((1, 2, 64, N), R.RefpixGeometry(1, 1000, N, 64, 1, 2, 4, "SUBX")),
    "corner_1out": ((2, 3, 160, 160), R.RefpixGeometry(1, 1, 160, 160, -1, 2, 1, "SUB160")),
    "far_corner_1out_fast2": ((1, 3, 96, 64), R.RefpixGeometry(1985, 1, 64, 96, -2, -1, 1, "SUB64")),
    "odd_offset_1out": ((1, 2, 64, 80), R.RefpixGeometry(1, 2, 80, 64, 1, 2, 1, "SUBX")),
    "nrs_edgeless": ((1, 2, 32, N), R.RefpixGeometry(1, 1000, N, 32, 2, 1, 1, "SUB32")),
}


@pytest.mark.parametrize("name", list(GEOMS))
def test_chunks_equal_whole_frame(name):
    shape, geom = GEOMS[name]
    d, pdq = ramp(shape, seed=len(name))
    flag_ref(pdq, geom)
    whole = d.copy()
    st = R.correct_refpix_frame(whole, pdq, geom)
    out, plan = streamed(d, pdq, geom, chunk=37)
    assert st == plan.status == "COMPLETE" and plan.active
    assert np.array_equal(out, whole) and not np.array_equal(out, d)


# ----------------------------------------------------------------------------- parity with jwst
CKP = {"refpix_algorithm": "median", "sirs_kernel_model": None, "sigreject": 4.0,
       "gaussmooth": 1.0, "halfwidth": 30}


def jwst_refpix(data, pdq, geom, zeroframe=None, odd_even=True, side=True):
    jr = pytest.importorskip("jwst.refpix.reference_pixels")
    from stdatamodels.jwst.datamodels import RampModel

    m = RampModel(data=data.copy(), pixeldq=pdq.copy(), groupdq=np.zeros(data.shape, np.uint8))
    m.meta.instrument.name, m.meta.instrument.detector = "NIRCAM", "NRCA1"
    s = m.meta.subarray
    s.xstart, s.ystart, s.xsize, s.ysize = geom.xstart, geom.ystart, geom.xsize, geom.ysize
    s.fastaxis, s.slowaxis = geom.fastaxis, geom.slowaxis
    m.meta.exposure.noutputs = geom.noutputs
    m.meta.exposure.zero_frame = zeroframe is not None
    if zeroframe is not None:
        m.zeroframe = zeroframe.copy()
    with _quiet():
        s.name = geom.subarray
        status = jr.correct_model(m, odd_even, side, 11, 1.0, False, CKP, 3.0)
    return m, status


class _quiet:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")
        logging.disable(logging.CRITICAL)

    def __exit__(self, *exc):
        logging.disable(logging.NOTSET)
        self._w.__exit__(*exc)


@pytest.mark.parity
@pytest.mark.parametrize("name", ["full_nircam", "stripe_4out", "corner_1out",
                                  "far_corner_1out_fast2", "odd_offset_1out", "nrs_edgeless"])
def test_parity_with_jwst(name):
    shape, geom = GEOMS[name]
    d, pdq = ramp(shape, seed=len(name) + 1)
    flag_ref(pdq, geom)
    m, status = jwst_refpix(d, pdq, geom)
    out, plan = streamed(d, pdq, geom, chunk=64)
    assert status == 0 and plan.status == "COMPLETE"
    assert np.array_equal(out, m.data)


@pytest.mark.parity
@pytest.mark.parametrize("odd_even,side", [(True, True), (False, False)])
def test_parity_options_zeroframe_and_edge_cases(odd_even, side):
    shape, geom = GEOMS["full_niriss"]  # detector frame transposed and flipped
    d, pdq = ramp(shape, seed=5)
    # NIRISS orientation: detector rows 0-3 are DMS columns 2044-2047, outputs are row bands
    d[:, :, 1024:1536, -4:] = 42.0  # one output: all-equal reference values (float64 branch)
    pdq[512:1024, :4] |= DNU  # another output: one reference edge unusable
    zf = (d[:, 0] * 0.9).astype(np.float32)
    zf[:, ::7, ::5] = 0.0
    m, status = jwst_refpix(d, pdq, geom, zeroframe=zf, odd_even=odd_even, side=side)
    kw = dict(odd_even_columns=odd_even, use_side_ref_pixels=side)
    out, _ = streamed(d, pdq, geom, **kw)
    assert np.array_equal(out, m.data)
    zplan = R.measure_refpix(R.RefBorder.from_array(zf[:, None]), R.RefBorder.from_array(pdq),
                             geom, zeroframe=True, **kw)
    zo = zf[:, None].copy()
    R.apply_refpix(zo, zplan)
    assert np.array_equal(zo[:, 0], m.zeroframe)


@pytest.mark.parity
def test_parity_subarray_4out_interior_and_skip():
    for geom, shape in [(GEOMS["interior_4out"][1], (1, 2, 64, N)),
                        (R.RefpixGeometry(2040, 1, 64, 64, 1, 2, 1, "SUBX"), (1, 2, 64, 64))]:
        d, pdq = ramp(shape, seed=9)
        flag_ref(pdq, geom)
        m, status = jwst_refpix(d, pdq, geom)
        out, plan = streamed(d, pdq, geom)
        assert np.array_equal(out, m.data)
        assert (status == 2) == (plan.status == "SKIPPED")
