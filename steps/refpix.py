"""Reference-pixel correction for near-IR detectors, split for row-chunk streaming.

Reproduces jwst 3.0.0 ``RefPixStep`` (``reference_pixels.NIRDataset``) with
``refpix_algorithm='median'`` for NIRCam, NIRISS, FGS and NIRSpec (not IRS2).  All geometry is
evaluated in the detector frame (FASTAXIS/SLOWAXIS), where the 4 outputs are 512-column bands
along the fast axis, the top/bottom reference rows are slow-axis rows 0-3 and 2044-2047 and the
side reference columns are fast-axis columns 0-3 and 2044-2047 of the 2048x2048 detector.

Algorithms (what jwst does, reproduced here):

* full frame, or subarray with NOUTPUTS=4 (embedded in the full detector, everything outside it
  DO_NOT_USE): per group and per output, sigma-clipped (3 sigma, iterated) means of the top and of
  the bottom reference rows, separately for even and odd detector columns, excluding DO_NOT_USE
  reference pixels; top and bottom are averaged (a missing one is ignored) and subtracted from
  the output's columns of that parity; an output lacking either parity is not corrected.  Then the
  side correction: the left and right reference columns (already corrected above) are median
  filtered along the slow axis (window ``side_smoothing_length`` rows, mirror-reflected at the
  ends, DO_NOT_USE excluded), left/right averaged per detector row (NaN-aware, both missing -> 0)
  and ``side_gain`` times that is subtracted from every pixel of the detector row.
* subarray with NOUTPUTS != 4: one sigma-clipped mean over all pixels flagged REFERENCE_PIXEL and
  not DO_NOT_USE (per column parity with ``odd_even_columns``), subtracted from the whole
  subarray; no side correction; no reference pixels -> no correction (step still COMPLETE).
  NIRSpec SUB512/SUB512S/SUB32 get their first/last 4 columns flagged as reference pixels.
* a subarray that does not fit in 2048x2048 is skipped (status SKIPPED).

jwst promotes the working group array to float64 after the first group when the side correction
is on (full-frame path); the plan records which groups are computed in float64 so results are
bit-identical.

Streaming: ``measure_refpix`` (once per exposure, from the reference-pixel border only) returns a
small :class:`RefpixPlan`; ``apply_refpix`` subtracts it from any row chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from . import dqflags

__all__ = [
    "RefpixGeometry",
    "RefBorder",
    "RefpixPlan",
    "measure_refpix",
    "apply_refpix",
    "correct_refpix_frame",
    "NRS_EDGELESS_SUBARRAYS",
]

NFULL = 2048
NREF = 4
AMP_WIDTH = 512
NRS_EDGELESS_SUBARRAYS = ("SUB512", "SUB512S", "SUB32")

_DNU = np.uint32(dqflags.DO_NOT_USE)
_REF = np.uint32(dqflags.REFERENCE_PIXEL)
_JIT = dict(cache=True, nogil=True)


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RefpixGeometry:
    """Where the (sub)array sits on the detector: SUBSTRT1/2 (1-based), SUBSIZE1/2,
    FASTAXIS, SLOWAXIS, NOUTPUTS and the SUBARRAY name."""

    xstart: int = 1
    ystart: int = 1
    xsize: int = NFULL
    ysize: int = NFULL
    fastaxis: int = 1
    slowaxis: int = 2
    noutputs: int | None = 4
    subarray: str | None = "FULL"

    def is_subarray(self, ny: int, nx: int) -> bool:
        """jwst's test: a NIR array smaller than 2048 in either axis."""
        return nx < NFULL or ny < NFULL

    def offsets(self, ny: int, nx: int) -> tuple[int, int]:
        """(rowstart, colstart) of the array in the full DMS frame (0 for full frame)."""
        if not self.is_subarray(ny, nx):
            return 0, 0
        return int(self.ystart) - 1, int(self.xstart) - 1

    def fits(self, ny: int, nx: int) -> bool:
        r0, c0 = self.offsets(ny, nx)
        return r0 >= 0 and c0 >= 0 and r0 + ny <= NFULL and c0 + nx <= NFULL

    def to_detector(self, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Full-frame DMS (row, col) -> detector (slow, fast) indices."""
        n1 = NFULL - 1
        if abs(self.fastaxis) == 1:
            s = yy if self.slowaxis > 0 else n1 - yy
            f = xx if self.fastaxis > 0 else n1 - xx
        else:
            f = yy if self.fastaxis > 0 else n1 - yy
            s = xx if self.slowaxis > 0 else n1 - xx
        return s, f

    def to_dms(self, s: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Detector (slow, fast) -> full-frame DMS (row, col) indices."""
        n1 = NFULL - 1
        if abs(self.fastaxis) == 1:
            yy = s if self.slowaxis > 0 else n1 - s
            xx = f if self.fastaxis > 0 else n1 - f
        else:
            yy = f if self.fastaxis > 0 else n1 - f
            xx = s if self.slowaxis > 0 else n1 - s
        return yy, xx


# --------------------------------------------------------------------------------------------
# reference-pixel border of a (sub)array
# --------------------------------------------------------------------------------------------
@dataclass
class RefBorder:
    """The pixels within ``NREF`` of the edges of a (sub)array, DMS orientation.

    ``bottom``: (..., nb, nx) rows [0, nb); ``top``: (..., nt, nx) rows [ny-nt, ny);
    ``left``: (..., ny, nl) columns [0, nl); ``right``: (..., ny, nr) columns [nx-nr, nx).
    The leading axes are (nints, ngroups) for ramps and empty for pixel DQ.  Every reference
    pixel of a (sub)array lies in this border.
    """

    bottom: np.ndarray
    top: np.ndarray
    left: np.ndarray
    right: np.ndarray
    ny: int
    nx: int

    @staticmethod
    def widths(ny: int, nx: int) -> tuple[int, int]:
        return min(NREF, ny), min(NREF, nx)

    @classmethod
    def empty(cls, lead: tuple[int, ...], ny: int, nx: int, dtype) -> "RefBorder":
        """Allocate a border to be filled chunk by chunk with :meth:`fill`."""
        wy, wx = cls.widths(ny, nx)
        return cls(np.zeros(lead + (wy, nx), dtype), np.zeros(lead + (wy, nx), dtype),
                   np.zeros(lead + (ny, wx), dtype), np.zeros(lead + (ny, wx), dtype), ny, nx)

    @classmethod
    def from_array(cls, a: np.ndarray) -> "RefBorder":
        """Cut the border out of a whole array (..., ny, nx) (copies)."""
        ny, nx = a.shape[-2:]
        b = cls.empty(a.shape[:-2], ny, nx, a.dtype)
        b.fill(a, 0)
        return b

    def fill(self, chunk: np.ndarray, row_start: int) -> None:
        """Copy the border pixels found in rows [row_start, row_start + chunk rows) of ``chunk``."""
        ny, nx = self.ny, self.nx
        wy, wx = self.widths(ny, nx)
        r0, r1 = row_start, row_start + chunk.shape[-2]
        lo, hi = max(r0, 0), min(r1, wy)
        if hi > lo:
            self.bottom[..., lo:hi, :] = chunk[..., lo - r0:hi - r0, :]
        lo, hi = max(r0, ny - wy), min(r1, ny)
        if hi > lo:
            self.top[..., lo - (ny - wy):hi - (ny - wy), :] = chunk[..., lo - r0:hi - r0, :]
        lo, hi = max(r0, 0), min(r1, ny)
        if hi > lo:
            self.left[..., lo:hi, :] = chunk[..., lo - r0:hi - r0, :wx]
            self.right[..., lo:hi, :] = chunk[..., lo - r0:hi - r0, nx - wx:]

    def gather(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Values at border pixels (y, x) (1-D index arrays) -> (..., len(y))."""
        ny, nx = self.ny, self.nx
        wy, wx = self.widths(ny, nx)
        lead = self.bottom.shape[:-2]
        out = np.zeros(lead + (len(y),), dtype=self.bottom.dtype)
        sel_b = y < wy
        sel_t = ~sel_b & (y >= ny - wy)
        sel_l = ~sel_b & ~sel_t & (x < wx)
        sel_r = ~sel_b & ~sel_t & ~sel_l & (x >= nx - wx)
        if np.any(~(sel_b | sel_t | sel_l | sel_r)):
            raise ValueError("pixel outside the reference border requested")
        out[..., sel_b] = self.bottom[..., y[sel_b], x[sel_b]]
        out[..., sel_t] = self.top[..., y[sel_t] - (ny - wy), x[sel_t]]
        out[..., sel_l] = self.left[..., y[sel_l], x[sel_l]]
        out[..., sel_r] = self.right[..., y[sel_r], x[sel_r] - (nx - wx)]
        return out


# --------------------------------------------------------------------------------------------
# statistics replicating numpy's float32/float64 arithmetic
# --------------------------------------------------------------------------------------------
@numba.njit(**_JIT)
def _pw_block(a, lo, n):
    """numpy's pairwise-sum leaf (n <= 128): 8 interleaved partial sums, then the rest."""
    if n < 8:
        res = a[lo]
        for k in range(lo + 1, lo + n):
            res += a[k]
        return res
    r0 = a[lo]
    r1 = a[lo + 1]
    r2 = a[lo + 2]
    r3 = a[lo + 3]
    r4 = a[lo + 4]
    r5 = a[lo + 5]
    r6 = a[lo + 6]
    r7 = a[lo + 7]
    k = 8
    stop = n - (n % 8)
    while k < stop:
        r0 += a[lo + k]
        r1 += a[lo + k + 1]
        r2 += a[lo + k + 2]
        r3 += a[lo + k + 3]
        r4 += a[lo + k + 4]
        r5 += a[lo + k + 5]
        r6 += a[lo + k + 6]
        r7 += a[lo + k + 7]
        k += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while k < n:
        res += a[lo + k]
        k += 1
    return res


@numba.njit(**_JIT)
def _pw_sum(a, lo, n):
    """Sum of a[lo:lo+n] (n >= 1) in a's dtype, in numpy's pairwise summation order.

    numpy halves blocks larger than 128 (at a multiple of 8) and adds the halves; the recursion
    is unrolled with an explicit stack (numba's cache cannot hold recursive functions).
    """
    if n <= 128:
        return _pw_block(a, lo, n)
    st_lo = np.empty(192, np.int64)
    st_n = np.empty(192, np.int64)
    st_combine = np.empty(192, np.bool_)
    vals = np.empty(192, a.dtype)
    sp = 0
    vp = 0
    st_lo[0] = lo
    st_n[0] = n
    st_combine[0] = False
    sp = 1
    while sp > 0:
        sp -= 1
        l = st_lo[sp]
        m = st_n[sp]
        if st_combine[sp]:
            vals[vp - 2] = vals[vp - 2] + vals[vp - 1]
            vp -= 1
            continue
        if m <= 128:
            vals[vp] = _pw_block(a, l, m)
            vp += 1
            continue
        n2 = m // 2
        n2 -= n2 % 8
        st_lo[sp] = l
        st_n[sp] = m
        st_combine[sp] = True
        st_lo[sp + 1] = l + n2
        st_n[sp + 1] = m - n2
        st_combine[sp + 1] = False
        st_lo[sp + 2] = l
        st_n[sp + 2] = n2
        st_combine[sp + 2] = False
        sp += 3
    return vals[0]


@numba.njit(**_JIT)
def _mean(a, n, tmp):
    """numpy ``a[:n].mean()`` in a's dtype (``tmp``: 1-element scratch of that dtype)."""
    if n == 0:
        tmp[0] = np.nan
        return tmp[0]
    s = _pw_sum(a, 0, n)
    tmp[0] = n
    return s / tmp[0]


@numba.njit(**_JIT)
def _std(a, n, sq, tmp):
    """numpy ``a[:n].std()`` in a's dtype (``sq``: scratch like ``a``)."""
    if n == 0:
        tmp[0] = np.nan
        return tmp[0]
    m = _mean(a, n, tmp)
    for k in range(n):
        d = a[k] - m
        sq[k] = d * d
    v = _pw_sum(sq, 0, n)
    tmp[0] = n
    return np.sqrt(v / tmp[0])


@numba.njit(**_JIT)
def _sigma_clip_mean(vals, n, siglimit, work, sq, tmp):
    """jwst ``Dataset.sigma_clip`` on vals[:n] (already DO_NOT_USE-filtered).

    Returns (ok, value, value_is_float32): all-equal values take jwst's float64 branch.
    """
    if n == 0:
        return False, 0.0, True
    first = vals[0]
    alleq = not np.isnan(first)
    for k in range(1, n):
        if vals[k] != first:
            alleq = False
            break
    if alleq:
        return True, np.float64(first), False
    for k in range(n):
        work[k] = vals[k]
    tmp[0] = siglimit
    lim = tmp[0]
    m = n
    while True:
        sd = _std(work, m, sq, tmp)
        mu = _mean(work, m, tmp)
        lo = mu - sd * lim
        hi = mu + sd * lim
        kept = 0
        for k in range(m):
            v = work[k]
            if v >= lo and v <= hi:
                work[kept] = v
                kept += 1
        delta = m - kept
        m = kept
        if delta == 0:
            break
    return True, np.float64(_mean(work, m, tmp)), True


@numba.njit(**_JIT)
def _average_with_none(ok_a, a, a32, ok_b, b, b32):
    """jwst ``average_with_none`` with numpy's float32/float64 promotion."""
    if not ok_a and not ok_b:
        return False, 0.0, True
    if not ok_a:
        return True, b, b32
    if not ok_b:
        return True, a, a32
    if a32 and b32:
        return True, np.float64((np.float32(a) + np.float32(b)) * np.float32(0.5)), True
    return True, 0.5 * (a + b), False


@numba.njit(**_JIT)
def _running_median(block, good, length, out, buf, tmp):
    """jwst ``median_filter``: per detector row, the median of the good pixels of ``block``
    (nrows, ncols) in a mirror-reflected window of ``length`` rows -> out (float64, NaN if none)."""
    nrows, ncols = block.shape
    h = length // 2
    for s in range(nrows):
        cnt = 0
        for k in range(length):
            j = s - h + k
            if j < 0:
                j = -j
            elif j > nrows - 1:
                j = 2 * (nrows - 1) - j
            for c in range(ncols):
                if good[j, c]:
                    buf[cnt] = block[j, c]
                    cnt += 1
        if cnt == 0:
            out[s] = np.nan
            continue
        hasnan = False
        for k in range(cnt):
            if np.isnan(buf[k]):
                hasnan = True
        if hasnan:
            out[s] = np.nan
            continue
        # insertion sort (<= length * ncols values)
        for k in range(1, cnt):
            v = buf[k]
            q = k - 1
            while q >= 0 and buf[q] > v:
                buf[q + 1] = buf[q]
                q -= 1
            buf[q + 1] = v
        if cnt % 2 == 1:
            out[s] = np.float64(buf[cnt // 2])
        else:
            tmp[0] = 2
            out[s] = np.float64((buf[cnt // 2 - 1] + buf[cnt // 2]) / tmp[0])


# --------------------------------------------------------------------------------------------
# per-group measurement
# --------------------------------------------------------------------------------------------
@numba.njit(**_JIT)
def _fullframe_group(rows, rgood, side, sgood, odd_even, use_side, length, siglimit, is_f32,
                     tb, tb32, gain, side_out):
    """Top/bottom means per output and parity, then (optionally) the side signal.

    rows (8, 2048): detector rows 0-3 then 2044-2047; side (2048, 8): detector columns 0-3 then
    2044-2047 (modified: top/bottom correction applied).  tb/tb32 (4, 2) outputs; side_out (2048,)
    gets side_gain * side signal.
    """
    npix = NREF * AMP_WIDTH
    vals = np.empty(npix, rows.dtype)
    work = np.empty(npix, rows.dtype)
    sq = np.empty(npix, rows.dtype)
    tmp = np.empty(1, rows.dtype)
    valid = np.zeros(4, np.bool_)
    for a in range(4):
        nparity = 2 if odd_even else 1
        step = 2 if odd_even else 1
        okp = True
        for p in range(nparity):
            res_ok = np.zeros(2, np.bool_)
            res_v = np.zeros(2, np.float64)
            res_32 = np.zeros(2, np.bool_)
            for e in range(2):  # 0: top, 1: bottom
                r0 = NREF if e == 0 else 0
                n = 0
                for r in range(r0, r0 + NREF):
                    for f in range(a * AMP_WIDTH + p, (a + 1) * AMP_WIDTH, step):
                        if rgood[r, f]:
                            vals[n] = rows[r, f]
                            n += 1
                ok, v, v32 = _sigma_clip_mean(vals, n, siglimit, work, sq, tmp)
                if ok and not is_f32:
                    v32 = False
                res_ok[e] = ok
                res_v[e] = v
                res_32[e] = v32
            ok, v, v32 = _average_with_none(res_ok[0], res_v[0], res_32[0],
                                            res_ok[1], res_v[1], res_32[1])
            if not ok:
                okp = False
            tb[a, p] = v
            tb32[a, p] = v32
        if not odd_even:
            tb[a, 1] = tb[a, 0]
            tb32[a, 1] = tb32[a, 0]
        valid[a] = okp
        if not okp:
            tb[a, 0] = 0.0
            tb[a, 1] = 0.0
            tb32[a, 0] = True
            tb32[a, 1] = True
    if not use_side:
        return
    nrows = side.shape[0]
    for c in range(2 * NREF):
        f = c if c < NREF else NFULL - 2 * NREF + c
        a = 0 if c < NREF else 3
        if not valid[a]:
            continue
        v = tb[a, f % 2]
        v32 = tb32[a, f % 2]
        for s in range(nrows):
            if is_f32 and v32:
                tmp[0] = v
                side[s, c] = side[s, c] - tmp[0]
            else:
                side[s, c] = np.float64(side[s, c]) - v
    left = np.empty(nrows, np.float64)
    right = np.empty(nrows, np.float64)
    buf = np.empty(length * NREF, side.dtype)
    _running_median(side[:, :NREF], sgood[:, :NREF], length, left, buf, tmp)
    _running_median(side[:, NREF:], sgood[:, NREF:], length, right, buf, tmp)
    for s in range(nrows):
        a_, b_ = left[s], right[s]
        if np.isnan(a_) and np.isnan(b_):
            comb = 0.0
        elif np.isnan(a_):
            comb = b_
        elif np.isnan(b_):
            comb = a_
        else:
            comb = 0.5 * (a_ + b_)
        side_out[s] = gain * comb


@numba.njit(**_JIT)
def _measure_fullframe(rows, rgood, side, sgood, arith64, odd_even, use_side, length, siglimit,
                       gain, tb, tb32, side_out):
    nints, ngroups = rows.shape[:2]
    for i in range(nints):
        for g in range(ngroups):
            if arith64[i, g]:
                _fullframe_group(rows[i, g].astype(np.float64), rgood,
                                 side[i, g].astype(np.float64), sgood, odd_even, use_side,
                                 length, siglimit, False, tb[i, g], tb32[i, g], gain,
                                 side_out[i, g])
            else:
                _fullframe_group(rows[i, g].copy(), rgood, side[i, g].copy(), sgood, odd_even,
                                 use_side, length, siglimit, True, tb[i, g], tb32[i, g], gain,
                                 side_out[i, g])


@numba.njit(**_JIT)
def _measure_subarray(vals, parity, odd_even, siglimit, tb, tb32):
    """vals (nints, ngroups, nref) in detector row-major order, parity (nref,) of the column."""
    nints, ngroups, nref = vals.shape
    buf = np.empty(nref, vals.dtype)
    work = np.empty(nref, vals.dtype)
    sq = np.empty(nref, vals.dtype)
    tmp = np.empty(1, vals.dtype)
    for i in range(nints):
        for g in range(ngroups):
            for p in range(2 if odd_even else 1):
                n = 0
                for k in range(nref):
                    if not odd_even or parity[k] == p:
                        buf[n] = vals[i, g, k]
                        n += 1
                ok, v, v32 = _sigma_clip_mean(buf, n, siglimit, work, sq, tmp)
                if not ok:  # jwst would fail here; leave that parity uncorrected
                    v, v32 = 0.0, True
                for a in range(4):
                    tb[i, g, a, p] = v
                    tb32[i, g, a, p] = v32
                    if not odd_even:
                        tb[i, g, a, 1] = v
                        tb32[i, g, a, 1] = v32


# --------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------
@dataclass
class RefpixPlan:
    """Per-group corrections measured from the reference pixels of one exposure.

    ``tb``/``tb_is32`` (nints, ngroups, 4, 2): value subtracted per output and column parity
    (float64 holding the value jwst computes; ``tb_is32`` marks float32 values, subtracted in
    float32 arithmetic).  ``side`` (nints, ngroups, 2048) float64: side_gain x side signal per
    detector row, or None.  ``arith64`` (nints, ngroups): groups jwst corrects in float64.
    ``code_row``/``code_col`` give 2*output+parity per DMS row/column, ``srow_row``/``srow_col``
    the detector row (one of each pair is zero, depending on the fast axis); ``fast_along_x``
    is True when the detector fast axis runs along DMS columns (|FASTAXIS| = 1).
    """

    status: str
    algorithm: str
    tb: np.ndarray
    tb_is32: np.ndarray
    side: np.ndarray | None
    arith64: np.ndarray
    code_row: np.ndarray
    code_col: np.ndarray
    srow_row: np.ndarray
    srow_col: np.ndarray
    fast_along_x: bool = True
    keep_zero: bool = False
    n_refpix: int = 0

    @property
    def active(self) -> bool:
        return self.status == "COMPLETE" and self.algorithm != "none"


def _index_maps(geom: RefpixGeometry, ny: int, nx: int):
    r0, c0 = geom.offsets(ny, nx)
    yy = np.arange(ny) + r0
    xx = np.arange(nx) + c0
    code_row = np.zeros(ny, np.int64)
    code_col = np.zeros(nx, np.int64)
    srow_row = np.zeros(ny, np.int64)
    srow_col = np.zeros(nx, np.int64)
    if abs(geom.fastaxis) == 1:
        s, _ = geom.to_detector(yy, np.zeros_like(yy))
        _, f = geom.to_detector(np.zeros_like(xx), xx)
        srow_row[:] = s
        code_col[:] = (f // AMP_WIDTH) * 2 + f % 2
    else:
        _, f = geom.to_detector(yy, np.zeros_like(yy))
        s, _ = geom.to_detector(np.zeros_like(xx), xx)
        srow_col[:] = s
        code_row[:] = (f // AMP_WIDTH) * 2 + f % 2
    return code_row, code_col, srow_row, srow_col


def _edgeless_dq(dq_border: RefBorder, geom: RefpixGeometry) -> RefBorder:
    """Border DQ with jwst's extra REFERENCE_PIXEL columns for NIRSpec edgeless subarrays."""
    if (geom.subarray or "").upper() not in NRS_EDGELESS_SUBARRAYS:
        return dq_border
    ny, nx = dq_border.ny, dq_border.nx
    out = RefBorder(dq_border.bottom.copy(), dq_border.top.copy(), dq_border.left.copy(),
                    dq_border.right.copy(), ny, nx)
    _, wx = RefBorder.widths(ny, nx)
    out.left[..., :] |= _REF
    out.right[..., :] |= _REF
    # rows of the border that are also in the first/last 4 columns
    out.bottom[..., :, :min(NREF, nx)] |= _REF
    out.bottom[..., :, max(nx - NREF, 0):] |= _REF
    out.top[..., :, :min(NREF, nx)] |= _REF
    out.top[..., :, max(nx - NREF, 0):] |= _REF
    return out


def _gather_detector(border: RefBorder, dq_border: RefBorder, geom: RefpixGeometry,
                     s: np.ndarray, f: np.ndarray):
    """Values and DQ at detector pixels (s, f); pixels outside the array: 0 and DNU|REF."""
    ny, nx = border.ny, border.nx
    r0, c0 = geom.offsets(ny, nx)
    yy, xx = geom.to_dms(s, f)
    y, x = yy - r0, xx - c0
    inside = (y >= 0) & (y < ny) & (x >= 0) & (x < nx)
    lead = border.bottom.shape[:-2]
    vals = np.zeros(lead + (len(s),), dtype=np.float32)
    dq = np.full(len(s), _DNU | _REF, dtype=np.uint32)
    if np.any(inside):
        vals[..., inside] = border.gather(y[inside], x[inside])
        dq[inside] = dq_border.gather(y[inside], x[inside])
    return vals, dq


def _empty_plan(status, algorithm, nints, ngroups, maps, keep_zero=False) -> RefpixPlan:
    return RefpixPlan(status, algorithm, np.zeros((nints, ngroups, 4, 2)),
                      np.ones((nints, ngroups, 4, 2), np.bool_), None,
                      np.zeros((nints, ngroups), np.bool_), *maps, keep_zero=keep_zero)


def measure_refpix(
    border: RefBorder,
    dq_border: RefBorder,
    geom: RefpixGeometry,
    *,
    odd_even_columns: bool = True,
    use_side_ref_pixels: bool = True,
    side_smoothing_length: int = 11,
    side_gain: float = 1.0,
    siglimit: float = 3.0,
    zeroframe: bool = False,
) -> RefpixPlan:
    """Measure the reference-pixel corrections of one exposure.

    ``border``: float32 :class:`RefBorder` of the ramp (leading axes (nints, ngroups)), values in
    DN after dq_init/saturation/superbias; ``dq_border``: uint32 border of the pixel DQ;
    ``geom``: subarray placement and readout.  With ``zeroframe=True`` the border is the ZEROFRAME
    as (nints, 1, ...) and the plan reproduces jwst's second pass over it (zeros stay zero).
    """
    ny, nx = border.ny, border.nx
    nints, ngroups = border.bottom.shape[:2]
    maps = _index_maps(geom, ny, nx) if geom.fits(ny, nx) else (
        np.zeros(ny, np.int64), np.zeros(nx, np.int64), np.zeros(ny, np.int64),
        np.zeros(nx, np.int64))
    if geom.is_subarray(ny, nx) and not geom.fits(ny, nx):
        return _empty_plan("SKIPPED", "none", nints, ngroups, maps, zeroframe)
    dq_border = _edgeless_dq(dq_border, geom) if geom.is_subarray(ny, nx) else dq_border
    length = int(side_smoothing_length)
    if length % 2 == 0:
        length += 1

    if not geom.is_subarray(ny, nx) or geom.noutputs == 4:
        det_rows = np.r_[0:NREF, NFULL - NREF:NFULL]
        s = np.repeat(det_rows, NFULL)
        f = np.tile(np.arange(NFULL), 2 * NREF)
        rv, rdq = _gather_detector(border, dq_border, geom, s, f)
        rows = rv.reshape(nints, ngroups, 2 * NREF, NFULL)
        rgood = ((rdq & _DNU) == 0).reshape(2 * NREF, NFULL)
        det_cols = np.r_[0:NREF, NFULL - NREF:NFULL]
        s = np.repeat(np.arange(NFULL), 2 * NREF)
        f = np.tile(det_cols, NFULL)
        sv, sdq = _gather_detector(border, dq_border, geom, s, f)
        side = sv.reshape(nints, ngroups, NFULL, 2 * NREF)
        sgood = ((sdq & _DNU) == 0).reshape(NFULL, 2 * NREF)
        arith64 = np.full((nints, ngroups), bool(use_side_ref_pixels))
        if not zeroframe:
            arith64[0, 0] = False
        tb = np.zeros((nints, ngroups, 4, 2))
        tb32 = np.ones((nints, ngroups, 4, 2), np.bool_)
        side_out = np.zeros((nints, ngroups, NFULL))
        _measure_fullframe(rows, rgood, side, sgood, arith64, bool(odd_even_columns),
                           bool(use_side_ref_pixels), length, float(siglimit), float(side_gain),
                           tb, tb32, side_out)
        return RefpixPlan("COMPLETE", "fullframe", tb, tb32,
                          side_out if use_side_ref_pixels else None, arith64, *maps,
                          fast_along_x=abs(geom.fastaxis) == 1, keep_zero=zeroframe,
                          n_refpix=int(rgood.sum() + sgood.sum()))

    # single-output subarray: all REFERENCE_PIXEL & !DO_NOT_USE pixels, detector row-major order
    wy, wx = RefBorder.widths(ny, nx)
    yy, xx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    inb = (yy < wy) | (yy >= ny - wy) | (xx < wx) | (xx >= nx - wx)
    y, x = yy[inb], xx[inb]
    dq = dq_border.gather(y, x)
    keep = ((dq & _REF) == _REF) & ((dq & _DNU) != _DNU)
    y, x = y[keep], x[keep]
    if len(y) == 0:
        return _empty_plan("COMPLETE", "none", nints, ngroups, maps, zeroframe)
    r0, c0 = geom.offsets(ny, nx)
    s, f = geom.to_detector(y + r0, x + c0)
    order = np.argsort(s * NFULL + f, kind="stable")
    vals = np.ascontiguousarray(border.gather(y[order], x[order]), dtype=np.float32)
    parity = (f[order] % 2).astype(np.int64)
    tb = np.zeros((nints, ngroups, 4, 2))
    tb32 = np.ones((nints, ngroups, 4, 2), np.bool_)
    _measure_subarray(vals, parity, bool(odd_even_columns), float(siglimit), tb, tb32)
    return RefpixPlan("COMPLETE", "subarray", tb, tb32, None,
                      np.zeros((nints, ngroups), np.bool_), *maps,
                      fast_along_x=abs(geom.fastaxis) == 1, keep_zero=zeroframe,
                      n_refpix=int(len(y)))


# --------------------------------------------------------------------------------------------
# apply
# --------------------------------------------------------------------------------------------
@numba.njit(**_JIT)
def _sub_tb(d, v, v32):
    """jwst's top/bottom subtraction: float32 arithmetic for float32 values, else via float64."""
    if v32:
        return d - np.float32(v)
    return np.float32(np.float64(d) - v)


@numba.njit(**_JIT)
def _apply_kernel(data, row_offset, tb, tb32, side, has_side, arith64, fast_x, code_row,
                  code_col, srow_row, srow_col, keep_zero):
    nints, ngroups, ny, nx = data.shape
    colv = np.zeros(nx, np.float64)
    col32 = np.ones(nx, np.bool_)
    cols = np.zeros(nx, np.float64)
    for i in range(nints):
        for g in range(ngroups):
            a64 = arith64[i, g]
            for x in range(nx):
                if fast_x:
                    c = code_col[x]
                    colv[x] = tb[i, g, c >> 1, c & 1]
                    col32[x] = tb32[i, g, c >> 1, c & 1]
                elif has_side:
                    cols[x] = side[i, g, srow_col[x]]
            for y in range(ny):
                yy = y + row_offset
                out = data[i, g, y]
                if fast_x:
                    sv = side[i, g, srow_row[yy]] if has_side else 0.0
                    if a64:
                        for x in range(nx):
                            d = out[x]
                            r = np.float32((np.float64(d) - colv[x]) - sv)
                            out[x] = d if (keep_zero and d == 0.0) else r
                    else:
                        for x in range(nx):
                            d = out[x]
                            r = _sub_tb(d, colv[x], col32[x])
                            if has_side:
                                r = np.float32(np.float64(r) - sv)
                            out[x] = d if (keep_zero and d == 0.0) else r
                else:
                    c = code_row[yy]
                    v = tb[i, g, c >> 1, c & 1]
                    v32 = tb32[i, g, c >> 1, c & 1]
                    if a64:
                        for x in range(nx):
                            d = out[x]
                            r = np.float32((np.float64(d) - v) - cols[x])
                            out[x] = d if (keep_zero and d == 0.0) else r
                    else:
                        for x in range(nx):
                            d = out[x]
                            r = _sub_tb(d, v, v32)
                            if has_side:
                                r = np.float32(np.float64(r) - cols[x])
                            out[x] = d if (keep_zero and d == 0.0) else r


def apply_refpix(chunk: np.ndarray, plan: RefpixPlan, row_offset: int = 0) -> None:
    """Subtract the planned corrections from a row chunk, in place.

    ``chunk`` float32 (nints, ngroups, nrows, nx) holding rows ``[row_offset, row_offset+nrows)``
    of the (sub)array the plan was measured on (no halo needed: the correction is per pixel).
    """
    if not plan.active:
        return
    nints, ngroups, nrows, nx = chunk.shape
    if (nints, ngroups) != plan.tb.shape[:2] or nx != len(plan.code_col):
        raise ValueError(f"chunk {chunk.shape} does not match the plan {plan.tb.shape[:2]}")
    if row_offset < 0 or row_offset + nrows > len(plan.code_row):
        raise ValueError(f"rows [{row_offset}, {row_offset + nrows}) outside the array")
    side = plan.side if plan.side is not None else np.zeros((nints, ngroups, 1))
    _apply_kernel(chunk, int(row_offset), plan.tb, plan.tb_is32, side, plan.side is not None,
                  plan.arith64, plan.fast_along_x, plan.code_row, plan.code_col, plan.srow_row,
                  plan.srow_col, bool(plan.keep_zero))


# --------------------------------------------------------------------------------------------
# whole-frame reference implementation (tests, non-streaming use)
# --------------------------------------------------------------------------------------------
def _science_to_detector(a: np.ndarray, geom: RefpixGeometry) -> np.ndarray:
    if abs(geom.fastaxis) == 1:
        return a[..., :: int(np.sign(geom.slowaxis)), :: int(np.sign(geom.fastaxis))]
    a = a[..., :: int(np.sign(geom.fastaxis)), :: int(np.sign(geom.slowaxis))]
    return np.swapaxes(a, -2, -1)


def _detector_to_science(a: np.ndarray, geom: RefpixGeometry) -> np.ndarray:
    if abs(geom.fastaxis) == 1:
        return a[..., :: int(np.sign(geom.slowaxis)), :: int(np.sign(geom.fastaxis))]
    a = np.swapaxes(a, -2, -1)
    return a[..., :: int(np.sign(geom.fastaxis)), :: int(np.sign(geom.slowaxis))]


def correct_refpix_frame(
    data: np.ndarray,
    pdq: np.ndarray,
    geom: RefpixGeometry,
    *,
    odd_even_columns: bool = True,
    use_side_ref_pixels: bool = True,
    side_smoothing_length: int = 11,
    side_gain: float = 1.0,
    siglimit: float = 3.0,
    zeroframe: bool = False,
) -> str:
    """Whole-array reference implementation (full-frame temporaries): embed the (sub)array in the
    detector frame, correct group by group, write back.  Returns the step status."""
    nints, ngroups, ny, nx = data.shape
    sub = geom.is_subarray(ny, nx)
    if sub and not geom.fits(ny, nx):
        return "SKIPPED"
    r0, c0 = geom.offsets(ny, nx)
    full_dq = np.full((NFULL, NFULL), 0, np.uint32)
    if sub:
        full_dq[:NREF, :] = _DNU | _REF
        full_dq[-NREF:, :] = _DNU | _REF
        full_dq[:, :NREF] = _DNU | _REF
        full_dq[:, -NREF:] = _DNU | _REF
    full_dq[r0:r0 + ny, c0:c0 + nx] = pdq
    if sub and (geom.subarray or "").upper() in NRS_EDGELESS_SUBARRAYS:
        full_dq[r0:r0 + ny, c0:c0 + NREF] |= _REF
        full_dq[r0:r0 + ny, c0 + nx - NREF:c0 + nx] |= _REF
    ddq = _science_to_detector(full_dq, geom)
    good = (ddq & _DNU) == 0
    length = int(side_smoothing_length) + (1 - int(side_smoothing_length) % 2)
    fullframe_path = (not sub) or geom.noutputs == 4
    if not fullframe_path:
        refmask = ((ddq & _REF) == _REF) & good
        if not refmask.any():
            return "COMPLETE"
        par = np.nonzero(refmask)[1] % 2
    frame = np.zeros((NFULL, NFULL), np.float64)
    for i in range(nints):
        for g in range(ngroups):
            a64 = fullframe_path and use_side_ref_pixels and (zeroframe or (i, g) != (0, 0))
            frame[:] = 0.0
            frame[r0:r0 + ny, c0:c0 + nx] = data[i, g]
            det = _science_to_detector(frame, geom).astype(np.float64 if a64 else np.float32)
            tmp = np.empty(1, det.dtype)
            n = NREF * AMP_WIDTH
            work, sq = np.empty(NFULL * NFULL // 2, det.dtype), np.empty(NFULL * NFULL // 2, det.dtype)
            if fullframe_path:
                step = 2 if odd_even_columns else 1
                for a in range(4):
                    sig = []
                    for p in (range(2) if odd_even_columns else range(1)):
                        res = []
                        for rs in (slice(NFULL - NREF, NFULL), slice(0, NREF)):
                            blk = det[rs, a * AMP_WIDTH + p:(a + 1) * AMP_WIDTH:step]
                            v = blk[good[rs, a * AMP_WIDTH + p:(a + 1) * AMP_WIDTH:step]]
                            res.append(_sigma_clip_mean(np.ascontiguousarray(v), len(v),
                                                        siglimit, work, sq, tmp))
                        (oa, va, ta), (ob, vb, tbb) = res
                        sig.append(_average_with_none(oa, va, ta and not a64, ob, vb, tbb and not a64))
                    if not odd_even_columns:
                        sig.append(sig[0])
                    if not (sig[0][0] and sig[1][0]):
                        continue
                    for p in range(2):
                        sl = (slice(None), slice(a * AMP_WIDTH + p, (a + 1) * AMP_WIDTH, 2))
                        v, v32 = sig[p][1], sig[p][2]
                        if v32 and not a64:
                            det[sl] = det[sl] - np.float32(v)
                        else:
                            det[sl] = (det[sl].astype(np.float64) - v).astype(det.dtype)
                if use_side_ref_pixels:
                    out = []
                    buf = np.empty(length * NREF, det.dtype)
                    for cs in (slice(0, NREF), slice(NFULL - NREF, NFULL)):
                        med = np.empty(NFULL)
                        _running_median(np.ascontiguousarray(det[:, cs]),
                                        np.ascontiguousarray(good[:, cs]), length, med, buf, tmp)
                        out.append(med)
                    left, right = out
                    comb = np.where(np.isnan(left), np.where(np.isnan(right), 0.0, right),
                                    np.where(np.isnan(right), left, 0.5 * (left + right)))
                    det = det.astype(np.float64) - (side_gain * comb)[:, None]
            else:
                vals = det[refmask]
                for p in (range(2) if odd_even_columns else range(1)):
                    v_in = np.ascontiguousarray(vals[par == p] if odd_even_columns else vals)
                    ok, v, v32 = _sigma_clip_mean(v_in, len(v_in), siglimit, work, sq, tmp)
                    if not ok:
                        continue
                    sl = (slice(None), slice(p, None, 2)) if odd_even_columns else (slice(None),) * 2
                    if v32:
                        det[sl] = det[sl] - np.float32(v)
                    else:
                        det[sl] = (det[sl].astype(np.float64) - v).astype(np.float32)
            back = _detector_to_science(det, geom)[r0:r0 + ny, c0:c0 + nx]
            if zeroframe:
                back = np.where(data[i, g] == 0.0, 0.0, back)
            data[i, g] = back
    return "COMPLETE"
