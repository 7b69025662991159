"""Near-IR ``calwebb_detector1`` correction kernels (NIRCam, NIRISS, NIRSpec non-IRS2, FGS).

Each function is a pure kernel on numpy arrays that reproduces what jwst 3.0.0 / stcal 1.20 do
with their code defaults; reading reference files, extracting subarrays and translating
reference DQ bits (``steps.dqflags.translate_reference_dq``) is the caller's job.

Array conventions (DMS orientation, C order):

* ramp ``data``: float32 ``(nints, ngroups, ny, nx)`` in DN, modified in place;
* ``gdq``: uint8, same shape; ``pdq``: uint32 ``(ny, nx)``; both modified in place;
* reference arrays: ``(ny, nx)`` (or ``(nplanes, ny, nx)``) covering the same rows as ``data``.

The pipeline calls these kernels on row chunks.  Elementwise kernels are exact on any chunk.
Spatial kernels (``saturation`` with growth, ``ipc``, ``charge_migration``) are exact on the
chunk rows that have at least ``*_halo()`` rows of real neighbours above and below (or a frame
edge); the halo rows themselves are modified too, with wrong values: do not write them back.

Floating-point operations follow numpy's type promotion in jwst/stcal (float32 where they work in
float32, float64 where numpy promotes), so results are bit-identical in the tested cases.
"""

from __future__ import annotations

from typing import Sequence

import numba
import numpy as np

from . import dqflags

__all__ = [
    "ATOD_LIMIT",
    "group_scale",
    "dq_init",
    "saturation",
    "saturation_halo",
    "read_pattern",
    "ipc",
    "ipc_halo",
    "ipc_nref",
    "superbias",
    "linearity",
    "dark_current",
    "dark_frames_plan",
    "DarkError",
    "charge_migration",
    "charge_migration_halo",
    "gain_scale",
]

#: Hard DN limit of the 16-bit A/D converter (jwst.saturation.ATOD_LIMIT).
ATOD_LIMIT = 65535.0

_DNU = np.uint8(dqflags.DO_NOT_USE)
_SAT = np.uint8(dqflags.SATURATED)
_ADF = np.uint8(dqflags.PIXEL["AD_FLOOR"])
_CHLO = np.uint8(dqflags.CHARGELOSS)
_NO_SAT_CHECK = np.uint32(dqflags.NO_SAT_CHECK)
_NO_LIN_CORR = np.uint32(dqflags.NO_LIN_CORR)

_JIT = dict(cache=True, nogil=True)


# --------------------------------------------------------------------------------------------
# group_scale
# --------------------------------------------------------------------------------------------
def group_scale(data: np.ndarray, frmdivsr: int | None, nframes: int | None) -> bool:
    """Rescale all groups by FRMDIVSR/NFRAMES (on-board averaging with a non-power-of-2 NFRAMES).

    ``data``: float32 (nints, ngroups, ny, nx), DN, scaled in place.  Applied only when both
    keywords are known and differ (otherwise jwst skips the step).  Returns whether applied.
    """
    if nframes is None or frmdivsr is None or int(frmdivsr) == int(nframes):
        return False
    scale = float(frmdivsr) / int(nframes)
    np.multiply(data, np.float32(scale), out=data)
    return True


# --------------------------------------------------------------------------------------------
# dq_init
# --------------------------------------------------------------------------------------------
def dq_init(pdq: np.ndarray, gdq: np.ndarray, mask_dq: np.ndarray) -> None:
    """OR the MASK reference DQ into the pixel DQ, and its DO_NOT_USE bit into every group.

    ``pdq`` uint32 (ny, nx), ``gdq`` uint8 (nints, ngroups, ny, nx), ``mask_dq`` uint32 (ny, nx)
    already in pipeline bits.  Both DQ arrays are modified in place.
    """
    mask = np.asarray(mask_dq, dtype=np.uint32)
    np.bitwise_or(pdq, mask, out=pdq)
    dnu = (mask & np.uint32(dqflags.DO_NOT_USE)).astype(np.uint8)
    np.bitwise_or(gdq, dnu, out=gdq)


# --------------------------------------------------------------------------------------------
# saturation
# --------------------------------------------------------------------------------------------
def read_pattern(ngroups: int, nframes: int) -> list[list[int]]:
    """The 1-based frame numbers in each group, as jwst builds them (GROUPGAP is ignored)."""
    return [[x + 1 + g * nframes for x in range(nframes)] for g in range(ngroups)]


def saturation_halo(n_pix_grow_sat: int = 1) -> int:
    """Halo rows ``saturation`` needs on each side of a chunk (growth of growth: 2n)."""
    return 2 * max(int(n_pix_grow_sat), 0)


@numba.njit(**_JIT)
def _grow_flag(plane, mask, words, flag, n):
    """OR ``flag`` into ``plane`` on the (2n+1)^2 box around every ``mask`` pixel.

    ``mask`` is uint8 (ny, nxp) zero-padded to a multiple of 8 columns and ``words`` the same
    memory as uint64 (ny, nxp // 8), scanned 8 pixels at a time.
    """
    ny, nx = plane.shape
    nw = words.shape[1]
    for y in range(ny):
        wrow = words[y]
        mrow = mask[y]
        for w in range(nw):
            if wrow[w] == 0:
                continue
            for x in range(8 * w, min(8 * w + 8, nx)):
                if mrow[x]:
                    for yy in range(max(0, y - n), min(ny, y + n + 1)):
                        prow = plane[yy]
                        for xx in range(max(0, x - n), min(nx, x + n + 1)):
                            prow[xx] |= flag


@numba.njit(**_JIT)
def _saturation_prepare(thr_in, sdq, pdq, limit, thr, nsc):
    """Effective thresholds (NO_SAT_CHECK or NaN -> ``limit``) and ``pdq |= sat_dq``, NaN
    thresholds also flagged NO_SAT_CHECK."""
    ny, nx = thr_in.shape
    for y in range(ny):
        for x in range(nx):
            t = thr_in[y, x]
            q = sdq[y, x]
            bad = np.isnan(t)
            c = bad or (q & _NO_SAT_CHECK) == _NO_SAT_CHECK
            nsc[y, x] = c
            thr[y, x] = limit if c else t
            pdq[y, x] |= q | (_NO_SAT_CHECK if bad else np.uint32(0))


@numba.njit(**_JIT)
def _saturation_kernel(data, gdq, thr, nsc, bias, dilution, use_readpatt, mean0, last2, len1,
                       ngrow, mask, words, tally):
    nints, ngroups, ny, nx = data.shape
    satdnu = _SAT | _DNU
    lowflag = _ADF | _DNU
    for i in range(nints):
        tally[:, :] = 0
        # forward pass: threshold crossing flags this group and all later ones
        for g in range(ngroups):
            nsat = 0
            for y in range(ny):
                drow = data[i, g, y]
                qrow = gdq[i, g, y]
                trow = thr[y]
                tal = tally[y]
                mrow = mask[y]
                for x in range(nx):  # branch-free (uint8 arithmetic) so that it vectorizes
                    d = drow[x]
                    t = tal[x] | np.uint8(d >= trow[x])
                    tal[x] = t
                    f = qrow[x] | (t * _SAT) | (np.uint8(d <= 0) * lowflag)
                    qrow[x] = f
                    m = (f >> 1) & np.uint8(1)  # SATURATED is bit 1
                    mrow[x] = m
                    nsat += m
            if ngrow > 0 and nsat > 0:
                _grow_flag(gdq[i, g], mask, words, _SAT, ngrow)
        if not use_readpatt:
            continue
        # backward pass: saturation hidden by frame averaging in the group before a saturated one
        for g in range(ngroups - 2, -1, -1):
            df = dilution[g]
            if df == 1.0:
                continue
            npart = 0
            for y in range(ny):
                drow = data[i, g, y]
                qrow = gdq[i, g, y]
                nrow = gdq[i, g + 1, y]
                trow = thr[y]
                crow = nsc[y]
                mrow = mask[y]
                for x in range(nx):  # branch-free so that it vectorizes
                    lim = np.float64(trow[x]) * (1.0 if crow[x] else df)
                    part = (((nrow[x] >> 1) & np.uint8(1))
                            & np.uint8((qrow[x] & satdnu) == 0)
                            & np.uint8(np.float64(drow[x]) >= lim))
                    mrow[x] = part
                    npart += part
            if npart > 0:
                _grow_flag(gdq[i, g], mask, words, _DNU, ngrow)
        # group-2 pass: a saturating event in the last frame of group 2 (index 1)
        if ngroups > 2:
            for y in range(ny):
                for x in range(nx):
                    if (gdq[i, 2, y, x] & _SAT) == 0 or (gdq[i, 1, y, x] & _SAT) != 0:
                        continue
                    b = bias[y, x]
                    d0 = data[i, 0, y, x]
                    t = thr[y, x]
                    s1 = d0 - b
                    if not (np.float64(s1) / mean0 * last2 + np.float64(b) < np.float64(t)):
                        continue
                    if (data[i, 1, y, x] - d0) > (t - d0) / len1:
                        gdq[i, 1, y, x] |= _DNU


@numba.njit(**_JIT)
def _zeroframe_saturation(zframe, thr, ngrow, mask, words, zdq):
    nints, ny, nx = zframe.shape
    for i in range(nints):
        for y in range(ny):
            for x in range(nx):
                d = zframe[i, y, x]
                f = np.uint8(0)
                if d >= thr[y, x]:
                    f |= _SAT
                if d <= 0:
                    f |= _ADF | _DNU
                zdq[y, x] = f
                mask[y, x] = (f & _SAT) != 0
        if ngrow > 0:
            _grow_flag(zdq, mask, words, _SAT, ngrow)
        for y in range(ny):
            for x in range(nx):
                if zdq[y, x] != 0:
                    zframe[i, y, x] = 0.0


def saturation(
    data: np.ndarray,
    gdq: np.ndarray,
    pdq: np.ndarray,
    sat_thresh: np.ndarray,
    sat_dq: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    nframes: int,
    n_pix_grow_sat: int = 1,
    use_readpatt: bool = True,
    zframe: np.ndarray | None = None,
    atod_limit: float = ATOD_LIMIT,
) -> None:
    """Flag saturation and A/D floor as jwst's SaturationStep (stcal ``flag_saturated_pixels``).

    ``data`` float32 (nints, ngroups, ny, nx) DN; ``gdq`` uint8 and ``pdq`` uint32 updated in
    place; ``sat_thresh`` float32 (ny, nx) DN and ``sat_dq`` uint32 from the SATURATION reference;
    ``bias`` float32 (ny, nx) DN: the raw SUPERBIAS (NaNs kept), or None.  ``nframes``: NFRAMES.

    * group >= threshold: SATURATED in it and all later groups, grown by ``n_pix_grow_sat``;
    * data <= 0: AD_FLOOR | DO_NOT_USE in that group only;
    * NO_SAT_CHECK or NaN threshold: never saturated (threshold = A/D limit + 1);
      NaN thresholds add NO_SAT_CHECK to the pixel DQ; ``pdq |= sat_dq``;
    * with ``use_readpatt``: DO_NOT_USE (grown) on the group before a saturated one whose
      frame-diluted value crosses the diluted threshold, and DO_NOT_USE on group 2 when group 3
      saturates, group 1 would not have, and the 1->2 jump could come from its last frame;
    * ``zframe`` (nints, ny, nx): saturated / floor values (grown) are set to 0.

    Chunk-safe with ``saturation_halo(n_pix_grow_sat)`` halo rows.
    """
    nints, ngroups, ny, nx = data.shape
    thr = np.empty((ny, nx), np.float32)
    nsc = np.empty((ny, nx), np.bool_)
    _saturation_prepare(np.ascontiguousarray(sat_thresh, dtype=np.float32),
                        np.ascontiguousarray(sat_dq, dtype=np.uint32), pdq,
                        np.float32(atod_limit + 1), thr, nsc)

    if bias is None:
        bias_arr = np.zeros((ny, nx), dtype=np.float32)
    else:
        bias_arr = np.ascontiguousarray(bias, dtype=np.float32)
    rp = read_pattern(max(ngroups, 3), int(nframes))
    dilution = np.array([np.mean(rp[g]) / rp[g][-1] for g in range(ngroups)], dtype=np.float64)
    mean0 = float(np.mean(rp[0]))
    last2 = float(rp[2][-1])
    len1 = np.float32(len(rp[1]))
    ngrow = int(n_pix_grow_sat)
    mask = np.zeros((ny, -(-nx // 8) * 8), dtype=np.uint8)
    words = mask.view(np.uint64)
    tally = np.empty((ny, nx), dtype=np.uint8)
    _saturation_kernel(data, gdq, thr, nsc, bias_arr, dilution, bool(use_readpatt), mean0,
                       last2, len1, ngrow, mask, words, tally)
    if zframe is not None:
        _zeroframe_saturation(zframe, thr, ngrow, mask, words, np.empty((ny, nx), dtype=np.uint8))


# --------------------------------------------------------------------------------------------
# ipc
# --------------------------------------------------------------------------------------------
def ipc_nref(xstart: int, ystart: int, xsize: int, ysize: int) -> tuple[int, int, int, int]:
    """(bottom, top, left, right) reference rows/columns inside a NIR (sub)array.

    ``xstart``/``ystart`` are 1-based SUBSTRT1/2, sizes SUBSIZE1/2 (jwst ``get_num_ref_pixels``).
    """
    x0, y0 = xstart - 1, ystart - 1
    return (max(0, 4 - y0), max(0, y0 + ysize - 2044), max(0, 4 - x0), max(0, x0 + xsize - 2044))


def ipc_halo(kernel: np.ndarray) -> int:
    """Halo rows ``ipc`` needs on each side of a chunk."""
    return int(kernel.shape[0]) // 2


@numba.njit(**_JIT)
def _ipc_kernel(data, kern, y0, y1, x0, x1, scratch, acc):
    """Convolve science rows [y0, y1) x cols [x0, x1) of every plane with the kernel.

    ``kern`` is (kh, kw, 1, 1) for a constant kernel or (kh, kw, ny, nx) per pixel.  Terms are
    accumulated in float32 in jwst's order (all off-centre terms row-major, the centre last) on a
    zero-padded copy of the science region (``scratch``), one output row at a time (``acc``).
    """
    nints, ngroups, ny, nx = data.shape
    kh, kw = kern.shape[0], kern.shape[1]
    per_pixel = kern.shape[2] > 1 or kern.shape[3] > 1
    bb = kh // 2
    lb = kw // 2
    w = x1 - x0
    for i in range(nints):
        for g in range(ngroups):
            scratch[:, :] = 0.0
            for y in range(y0, y1):
                src = data[i, g, y, x0:x1]
                dst = scratch[y + bb, x0 + lb:x1 + lb]
                for x in range(w):
                    dst[x] = src[x]
            for y in range(y0, y1):
                acc[:w] = 0.0
                for jj in range(kh * kw + 1):
                    if jj == kh * kw:
                        j, k = bb, lb  # centre term last
                    else:
                        j, k = jj // kw, jj % kw
                        if j == bb and k == lb:
                            continue
                    off = x0 + kw - 1 - k
                    srow = scratch[y + kh - 1 - j, off:off + w]
                    if per_pixel:
                        krow = kern[j, k, y, x0:x1]
                        for x in range(w):
                            acc[x] += krow[x] * srow[x]
                    else:
                        kv = kern[j, k, 0, 0]
                        for x in range(w):
                            acc[x] += kv * srow[x]
                out = data[i, g, y, x0:x1]
                for x in range(w):
                    out[x] = acc[x]


def ipc(
    data: np.ndarray,
    kernel: np.ndarray,
    nref: Sequence[int] = (0, 0, 0, 0),
    *,
    row_start: int = 0,
    frame_ny: int | None = None,
) -> None:
    """IPC deconvolution as jwst ``ipc_convolve``: convolve the science pixels with the kernel.

    ``data`` float32 (nints, ngroups, ny, nx) chunk covering frame rows
    ``[row_start, row_start + ny)`` of a frame with ``frame_ny`` rows (default: the chunk is the
    frame).  ``kernel`` float32 (kh, kw) or per-pixel (kh, kw, ny, nx) with the chunk's rows.
    ``nref`` = (bottom, top, left, right) reference rows/columns of the frame (``ipc_nref``):
    reference pixels are left unchanged and count as zero for their science neighbours.
    Chunk-safe with ``ipc_halo(kernel)`` halo rows.
    """
    nints, ngroups, ny, nx = data.shape
    frame_ny = ny if frame_ny is None else int(frame_ny)
    bottom, top, left, right = (int(v) for v in nref)
    # science rows of the frame, in chunk coordinates
    y0 = max(bottom - row_start, 0)
    y1 = min(frame_ny - top - row_start, ny)
    x0, x1 = left, nx - right
    if y1 <= y0 or x1 <= x0:
        return
    kern = np.asarray(kernel, dtype=np.float32)
    kh, kw = kern.shape[0], kern.shape[1]
    scratch = np.zeros((ny + kh - 1, nx + kw - 1), dtype=np.float32)
    acc = np.zeros(nx, dtype=np.float32)
    if kern.ndim == 2:
        kern = np.ascontiguousarray(kern[:, :, None, None])
    elif kern.ndim != 4:
        raise ValueError(f"IPC kernel must be 2-D or 4-D, got shape {kern.shape}")
    elif kern.shape[2:] != (ny, nx):
        raise ValueError(f"4-D IPC kernel rows/cols {kern.shape[2:]} do not match chunk {(ny, nx)}")
    _ipc_kernel(data, np.ascontiguousarray(kern), y0, y1, x0, x1, scratch, acc)


# --------------------------------------------------------------------------------------------
# superbias
# --------------------------------------------------------------------------------------------
@numba.njit(**_JIT)
def _subtract_plane(data, plane):
    """data[i, g] -= plane (NaN in plane counts as 0)."""
    nints, ngroups, ny, nx = data.shape
    row = np.empty(nx, np.float32)
    for y in range(ny):
        p = plane[y]
        for x in range(nx):
            b = p[x]
            row[x] = np.float32(0.0) if np.isnan(b) else b
        for i in range(nints):
            for g in range(ngroups):
                out = data[i, g, y]
                for x in range(nx):
                    out[x] -= row[x]


@numba.njit(**_JIT)
def _subtract_plane_keep_zero(zframe, plane):
    nints, ny, nx = zframe.shape
    for i in range(nints):
        for y in range(ny):
            for x in range(nx):
                b = plane[y, x]
                if zframe[i, y, x] != 0.0 and not np.isnan(b):
                    zframe[i, y, x] -= b


def superbias(
    data: np.ndarray,
    pdq: np.ndarray,
    bias: np.ndarray,
    bias_dq: np.ndarray,
    zframe: np.ndarray | None = None,
) -> None:
    """Subtract the superbias (NaN -> 0) from every group; ``pdq |= bias_dq``.

    ``data`` float32 (nints, ngroups, ny, nx) DN, ``bias`` float32 (ny, nx) DN, ``bias_dq``
    uint32 (ny, nx).  ``zframe`` (nints, ny, nx): bias subtracted, zeros (bad) kept at zero.
    """
    b = np.ascontiguousarray(bias, dtype=np.float32)
    np.bitwise_or(pdq, np.asarray(bias_dq, dtype=np.uint32), out=pdq)
    _subtract_plane(data, b)
    if zframe is not None:
        _subtract_plane_keep_zero(zframe, b)


# --------------------------------------------------------------------------------------------
# linearity
# --------------------------------------------------------------------------------------------
def _benign_coeffs(c: np.ndarray) -> np.ndarray:
    """Coefficients (0, 1, 0, ...) that leave a value unchanged, in the dtype of ``c``."""
    ben = np.zeros(c.shape[0], dtype=c.dtype)
    ben[1] = 1
    return ben


@numba.njit(**_JIT)
def _lin_flags(coeffs, lin_dq, benign, extra):
    nc, ny, nx = coeffs.shape
    nan = np.empty(nx, np.uint8)
    for y in range(ny):
        nan[:] = 0
        for k in range(nc):
            crow = coeffs[k, y]
            for x in range(nx):
                nan[x] |= np.uint8(np.isnan(crow[x]))
        qrow = lin_dq[y]
        lin = coeffs[1, y]
        brow = benign[y]
        erow = extra[y]
        for x in range(nx):
            flagged = (qrow[x] & _NO_LIN_CORR) == _NO_LIN_CORR
            bad = (not flagged) and (nan[x] != 0 or lin[x] == 0)
            brow[x] = flagged or bad
            erow[x] = _NO_LIN_CORR if bad else np.uint32(0)


def _prepare_lin_coeffs(coeffs, lin_dq):
    """Pixels to correct with benign coefficients, and the NO_LIN_CORR pixel flags to add.

    Returns (benign bool (ny, nx), extra_flags uint32 (ny, nx)), as stcal
    ``prepare_coefficients``: flagged NO_LIN_CORR in the reference -> benign; any NaN
    coefficient -> benign + NO_LIN_CORR; zero linear term -> benign + NO_LIN_CORR.
    """
    ny, nx = coeffs.shape[1:]
    benign = np.empty((ny, nx), np.bool_)
    extra = np.empty((ny, nx), np.uint32)
    _lin_flags(coeffs, np.ascontiguousarray(lin_dq, dtype=np.uint32), benign, extra)
    return benign, extra


@numba.njit(**_JIT)
def _coeff_row(c, y, benign, ben, out):
    """out (nc, nx) = coefficients of row y, identity coefficients ``ben`` for benign pixels."""
    nc, nx = out.shape
    brow = benign[y]
    for k in range(nc):
        src = c[k, y]
        dst = out[k]
        bk = ben[k]
        for x in range(nx):
            dst[x] = bk if brow[x] else src[x]


_BLOCK = 256  # columns per Horner block (keeps the accumulator in L1)


@numba.njit(**_JIT)
def _poly_block(cr, x0, n, d, out):
    """out[x] = sum_k cr[k, x0 + x] d[x]^k (x < n) by Horner's rule in stcal's order."""
    nc = cr.shape[0]
    top = cr[nc - 1, x0:x0 + n]
    for x in range(n):
        out[x] = top[x] * d[x]
    for j in range(nc - 2, 0, -1):
        cj = cr[j, x0:x0 + n]
        for x in range(n):
            out[x] = (out[x] + cj[x]) * d[x]
    c0 = cr[0, x0:x0 + n]
    for x in range(n):
        out[x] = out[x] + c0[x]


@numba.njit(**_JIT)
def _poly_row(cr, d, out):
    """out[x] = sum_k cr[k, x] d[x]^k by Horner's rule, in stcal's order, in out's dtype."""
    nx = out.shape[0]
    for x0 in range(0, nx, _BLOCK):
        n = min(_BLOCK, nx - x0)
        _poly_block(cr, x0, n, d[x0:x0 + n], out[x0:x0 + n])


@numba.njit(**_JIT)
def _linearity_kernel(data, gdq, coeffs, benign, ben):
    nints, ngroups, ny, nx = data.shape
    nc = coeffs.shape[0]
    cr = np.empty((nc, nx), coeffs.dtype)
    acc = np.empty(_BLOCK, coeffs.dtype)
    for y in range(ny):
        _coeff_row(coeffs, y, benign, ben, cr)
        for i in range(nints):
            for g in range(ngroups):
                for x0 in range(0, nx, _BLOCK):
                    n = min(_BLOCK, nx - x0)
                    d = data[i, g, y, x0:x0 + n]
                    q = gdq[i, g, y, x0:x0 + n]
                    _poly_block(cr, x0, n, d, acc)
                    for x in range(n):
                        d[x] = d[x] if q[x] & _SAT else acc[x]


@numba.njit(**_JIT)
def _linearity_readlevel_kernel(data, gdq, coeffs, benign, bc, icoeffs, ibenign, ibc, frames,
                                nfr, mean_res):
    """stcal read-level correction (inverse coefficients) for frame-averaged groups.

    Per pixel: linearize the first and the last unsaturated-but-one group, reconstruct every
    frame on that line, de-linearize (inverse coefficients), shift to match the group's mean,
    linearize each frame and average.  ``frames`` (ngroups, maxframes) float64 1-based frame
    numbers, ``nfr`` frames per group, ``mean_res`` the mean frame number of each group.
    Arithmetic as stcal: linearized first/last in float32, everything after in float64.
    """
    nints, ngroups, ny, nx = data.shape
    nc = coeffs.shape[0]
    nic = icoeffs.shape[0]
    maxf = frames.shape[1]
    cr = np.empty((nc, nx), coeffs.dtype)
    icr = np.empty((nic, nx), icoeffs.dtype)
    cnt = np.empty(nx, np.int64)
    first = np.empty(nx, coeffs.dtype)
    lastd = np.empty(nx, np.float32)
    last = np.empty(nx, coeffs.dtype)
    dreads = np.empty(nx, np.float64)
    rate = np.empty(nx, np.float64)
    ru = np.empty((maxf, nx), np.float64)
    work = np.empty(nx, np.float64)
    shifted = np.empty(nx, np.float64)
    acc = np.empty(nx, np.float64)
    for y in range(ny):
        _coeff_row(coeffs, y, benign, bc, cr)
        _coeff_row(icoeffs, y, ibenign, ibc, icr)
        for i in range(nints):
            cnt[:] = 0
            for g in range(ngroups):
                q = gdq[i, g, y]
                for x in range(nx):
                    cnt[x] += (q[x] & _SAT) == 0
            d0 = data[i, 0, y]
            q0 = gdq[i, 0, y]
            _poly_row(cr, d0, first)
            for x in range(nx):
                if q0[x] & _SAT:
                    first[x] = d0[x]
                lv = max(cnt[x] - 1, 2) - 1
                cnt[x] = lv
                lastd[x] = data[i, lv, y, x]
                dreads[x] = mean_res[lv] - mean_res[0]
            _poly_row(cr, lastd, last)
            for x in range(nx):
                lastv = lastd[x] if gdq[i, cnt[x], y, x] & _SAT else last[x]
                rate[x] = np.float64(lastv - first[x]) / dreads[x]
            for g in range(ngroups):
                d = data[i, g, y]
                q = gdq[i, g, y]
                n = nfr[g]
                for k in range(n):
                    fk = frames[g, k] - mean_res[0]
                    for x in range(nx):
                        work[x] = rate[x] * fk + np.float64(first[x])
                    _poly_row(icr, work, ru[k])
                for x in range(nx):
                    p = ru[0, x]
                    for k in range(1, n):
                        p += ru[k, x]
                    work[x] = np.float64(d[x]) - p / n  # offset to the measured group
                for k in range(n):
                    for x in range(nx):
                        shifted[x] = ru[k, x] + work[x]
                    _poly_row(cr, shifted, ru[k])
                for x in range(nx):
                    p = ru[0, x]
                    for k in range(1, n):
                        p += ru[k, x]
                    acc[x] = p / n
                for x in range(nx):
                    if not (q[x] & _SAT):
                        d[x] = acc[x]


@numba.njit(**_JIT)
def _zeroframe_linearity(zframe, coeffs, benign, ben):
    nints, ny, nx = zframe.shape
    nc = coeffs.shape[0]
    cr = np.empty((nc, nx), coeffs.dtype)
    acc = np.empty(nx, coeffs.dtype)
    for y in range(ny):
        _coeff_row(coeffs, y, benign, ben, cr)
        for i in range(nints):
            d = zframe[i, y]
            _poly_row(cr, d, acc)
            for x in range(nx):
                d[x] = 0.0 if d[x] == 0.0 else acc[x]


def linearity(
    data: np.ndarray,
    gdq: np.ndarray,
    pdq: np.ndarray,
    coeffs: np.ndarray,
    lin_dq: np.ndarray,
    *,
    inv_coeffs: np.ndarray | None = None,
    nframes: int = 1,
    zframe: np.ndarray | None = None,
) -> None:
    """Classic polynomial linearity correction (stcal ``linearity_correction``), in place.

    ``data`` float32 (nints, ngroups, ny, nx) DN; ``gdq`` uint8 (read only); ``pdq`` uint32
    (ny, nx) gets ``lin_dq`` and NO_LIN_CORR for NaN / zero-linear-term coefficients.
    ``coeffs`` float32 (ncoeffs, ny, nx): corrected = sum_k c_k d^k; groups flagged SATURATED and
    pixels flagged NO_LIN_CORR (reference) or with bad coefficients are left unchanged.

    jwst uses the read-level algorithm when the reference has INV_COEFFS and NFRAMES > 1 (and the
    exposure has no READ_TIMES): pass ``inv_coeffs`` (same shape) and ``nframes`` for it.
    ``zframe`` (nints, ny, nx) is corrected with the classic polynomial, zeros kept.
    """
    c = np.ascontiguousarray(coeffs)
    if c.ndim != 3 or c.shape[0] < 2:
        raise ValueError(f"linearity coefficients must be (ncoeffs>=2, ny, nx), got {c.shape}")
    benign, extra = _prepare_lin_coeffs(c, lin_dq)
    np.bitwise_or(pdq, np.asarray(lin_dq, dtype=np.uint32), out=pdq)
    np.bitwise_or(pdq, extra, out=pdq)
    nints, ngroups = data.shape[:2]
    if inv_coeffs is not None and int(nframes) > 1:
        ic = np.ascontiguousarray(inv_coeffs)
        ibenign, iextra = _prepare_lin_coeffs(ic, lin_dq)
        np.bitwise_or(pdq, iextra, out=pdq)
        if ngroups < 2:
            raise ValueError("read-level linearity needs at least 2 groups")
        rp = read_pattern(ngroups, int(nframes))
        frames = np.array(rp, dtype=np.float64)
        nfr = np.array([len(r) for r in rp], dtype=np.int64)
        mean_res = np.array([np.mean(r) for r in rp], dtype=np.float64)
        _linearity_readlevel_kernel(data, gdq, c, benign, _benign_coeffs(c), ic, ibenign,
                                    _benign_coeffs(ic), frames, nfr, mean_res)
    else:
        _linearity_kernel(data, gdq, c, benign, _benign_coeffs(c))
    if zframe is not None:
        _zeroframe_linearity(zframe, c, benign, _benign_coeffs(c))


# --------------------------------------------------------------------------------------------
# dark_current
# --------------------------------------------------------------------------------------------
class DarkError(ValueError):
    """The dark reference cannot be matched to the science readout pattern."""


def dark_frames_plan(
    ngroups: int, nframes: int, groupgap: int, dark_nplanes: int, dark_nframes: int,
    dark_groupgap: int,
) -> tuple[str, int]:
    """How stcal's dark_current matches a dark to the science readout.

    Returns (mode, n_extrapolated_planes) with mode ``"skip"`` (dark NFRAMES or GROUPGAP larger
    than the science ones: jwst leaves the data alone), ``"direct"`` (same NFRAMES and GROUPGAP:
    dark plane g is subtracted from group g) or ``"average"`` (group g gets the mean of dark planes
    ``g*(nframes+groupgap) ... +nframes-1``).  When the science exposure spans more frames than the
    dark, jwst linearly extrapolates the dark from its last two planes (n_extrapolated_planes>0).
    """
    sci_total = ngroups * nframes + (ngroups - 1) * groupgap
    drk_total = dark_nplanes * dark_nframes + (dark_nplanes - 1) * dark_groupgap
    n_extra = 0
    if sci_total > drk_total:
        n_extra = int(np.ceil((sci_total - drk_total + dark_groupgap) / (dark_nframes + dark_groupgap)))
    if dark_nframes > nframes or dark_groupgap > groupgap:
        return "skip", n_extra
    if nframes == dark_nframes and groupgap == dark_groupgap:
        return "direct", n_extra
    return "average", n_extra


@numba.njit(**_JIT)
def _dark_plane_value(dark, k, y, x, wide):
    """Dark plane k (extrapolated past the end from the last two planes), NaN -> 0.

    With ``wide`` (extrapolated dark, float64 in stcal) the value is float64, else float32.
    """
    nd = dark.shape[0]
    if k < nd:
        v = np.float64(dark[k, y, x])
    else:
        rate = dark[nd - 1, y, x] - dark[nd - 2, y, x]
        v = np.float64(k - nd + 1) * np.float64(rate) + np.float64(dark[nd - 1, y, x])
    if np.isnan(v):
        v = 0.0
    return v


@numba.njit(**_JIT)
def _dark_kernel(data, dark, starts, nframes, mode_direct, wide, nplanes):
    nints, ngroups, ny, nx = data.shape
    avg = np.empty(nx, dtype=np.float32)
    wide_row = np.empty(nx, dtype=np.float64)
    for y in range(ny):
        for g in range(ngroups):
            s = starts[g]
            if mode_direct and wide:
                for x in range(nx):
                    wide_row[x] = _dark_plane_value(dark, g, y, x, True)
                for i in range(nints):
                    out = data[i, g, y]
                    for x in range(nx):
                        out[x] = np.float32(np.float64(out[x]) - wide_row[x])
                continue
            if (mode_direct or nframes == 1) and not wide:
                k = g if mode_direct else s
                src = dark[k, y]
                for x in range(nx):
                    v = src[x]
                    avg[x] = np.float32(0.0) if np.isnan(v) else v
            elif mode_direct or nframes == 1:
                k = g if mode_direct else s
                for x in range(nx):
                    avg[x] = np.float32(_dark_plane_value(dark, k, y, x, wide))
            else:
                e = min(s + nframes, nplanes)
                cnt = e - s
                if cnt <= 0:
                    avg[:] = np.nan
                elif wide:
                    for x in range(nx):
                        acc = _dark_plane_value(dark, s, y, x, True)
                        for k in range(s + 1, e):
                            acc += _dark_plane_value(dark, k, y, x, True)
                        avg[x] = np.float32(acc / cnt)
                else:  # float32, planes added in order as numpy's mean over axis 0
                    src = dark[s, y]
                    for x in range(nx):
                        v = src[x]
                        avg[x] = np.float32(0.0) if np.isnan(v) else v
                    for k in range(s + 1, e):
                        src = dark[k, y]
                        for x in range(nx):
                            v = src[x]
                            avg[x] += np.float32(0.0) if np.isnan(v) else v
                    c32 = np.float32(cnt)
                    for x in range(nx):
                        avg[x] = avg[x] / c32
            for i in range(nints):
                out = data[i, g, y]
                for x in range(nx):
                    out[x] -= avg[x]


def dark_current(
    data: np.ndarray,
    pdq: np.ndarray,
    dark_sci: np.ndarray,
    dark_dq: np.ndarray,
    *,
    nframes: int,
    groupgap: int,
    dark_nframes: int,
    dark_groupgap: int,
    allow_extrapolation: bool = True,
) -> str:
    """Subtract the dark, frame-averaged to the science readout, as stcal ``dark_sub``.

    ``data`` float32 (nints, ngroups, ny, nx) DN (in place); ``pdq`` uint32 (ny, nx) gets
    ``dark_dq``; ``dark_sci`` float32 (ndark_planes, ny, nx) DN with its own NFRAMES/GROUPGAP
    (``dark_nframes``/``dark_groupgap``).  NaNs in the dark count as 0.  Returns ``"COMPLETE"`` or
    ``"SKIPPED"`` (dark NFRAMES/GROUPGAP larger than the science ones; data untouched).
    A dark shorter than the exposure is extrapolated as jwst does; with
    ``allow_extrapolation=False`` that raises :class:`DarkError` instead.
    """
    nints, ngroups, ny, nx = data.shape
    nd = int(dark_sci.shape[0])
    mode, n_extra = dark_frames_plan(ngroups, int(nframes), int(groupgap), nd, int(dark_nframes),
                                     int(dark_groupgap))
    if n_extra and not allow_extrapolation:
        raise DarkError(
            f"dark has {nd} planes (NFRAMES={dark_nframes}, GROUPGAP={dark_groupgap}) but the "
            f"exposure needs {ngroups * nframes + (ngroups - 1) * groupgap} frames")
    if n_extra and nd < 2:
        raise DarkError(f"cannot extrapolate a dark with {nd} plane(s) to the exposure length")
    if mode == "skip":
        return "SKIPPED"
    np.bitwise_or(pdq, np.asarray(dark_dq, dtype=np.uint32), out=pdq)
    starts = np.array([g * (int(nframes) + int(groupgap)) for g in range(ngroups)], dtype=np.int64)
    nplanes = nd + n_extra
    if mode == "direct" and ngroups > nplanes:
        raise DarkError(f"dark has {nplanes} planes for {ngroups} groups")
    if mode == "average" and int(nframes) == 1 and starts[-1] >= nplanes:
        raise DarkError(f"group {ngroups - 1} needs dark plane {starts[-1]}, the dark has {nplanes}")
    _dark_kernel(data, np.ascontiguousarray(dark_sci, dtype=np.float32), starts, int(nframes),
                 mode == "direct", n_extra > 0, nplanes)
    return "COMPLETE"


# --------------------------------------------------------------------------------------------
# charge_migration
# --------------------------------------------------------------------------------------------
def charge_migration_halo() -> int:
    """Halo rows ``charge_migration`` needs on each side of a chunk."""
    return 1


@numba.njit(**_JIT)
def _charge_migration_kernel(data, gdq, thresh, first):
    nints, ngroups, ny, nx = data.shape
    flag = _CHLO | _DNU
    for i in range(nints):
        for y in range(ny):
            for x in range(nx):
                first[y, x] = ngroups
        for g in range(ngroups - 1, -1, -1):
            for y in range(ny):
                drow = data[i, g, y]
                qrow = gdq[i, g, y]
                frow = first[y]
                for x in range(nx):
                    hit = drow[x] > thresh and qrow[x] != _DNU
                    frow[x] = g if hit else frow[x]
        for y in range(ny):
            for x in range(nx):
                m = first[y, x]
                if y > 0:
                    m = min(m, first[y - 1, x])
                if y < ny - 1:
                    m = min(m, first[y + 1, x])
                if x > 0:
                    m = min(m, first[y, x - 1])
                if x < nx - 1:
                    m = min(m, first[y, x + 1])
                for g in range(m, ngroups):
                    gdq[i, g, y, x] |= flag


def charge_migration(data: np.ndarray, gdq: np.ndarray, signal_threshold: float = 25000.0) -> bool:
    """Flag charge migration as jwst's ChargeMigrationStep (skipped by default in jwst).

    A group with ``data > signal_threshold`` (DN) whose group DQ is not exactly DO_NOT_USE gets
    CHARGELOSS | DO_NOT_USE in it and all later groups, and so do its 4 edge neighbours.  ``gdq``
    uint8 modified in place.  Returns False (nothing done) for fewer than 3 groups, as jwst.
    Chunk-safe with ``charge_migration_halo()`` halo rows.
    """
    nints, ngroups, ny, nx = data.shape
    if ngroups < 3:
        return False
    first = np.empty((ny, nx), dtype=np.int32)
    _charge_migration_kernel(data, gdq, np.float32(signal_threshold), first)
    return True


# --------------------------------------------------------------------------------------------
# gain_scale
# --------------------------------------------------------------------------------------------
def gain_scale(
    sci: np.ndarray,
    err: np.ndarray,
    var_poisson: np.ndarray | None,
    var_rnoise: np.ndarray | None,
    gain_factor: float,
) -> None:
    """Scale a rate/rateints product by GAINFACT: SCI, ERR x factor; variances x factor**2.

    All arrays float32 (ny, nx) or (nints, ny, nx), modified in place.
    """
    f = float(gain_factor)
    np.multiply(sci, np.float32(f), out=sci)
    np.multiply(err, np.float32(f), out=err)
    for var in (var_poisson, var_rnoise):
        if var is not None and np.size(var) > 0:
            np.multiply(var, np.float32(f ** 2), out=var)
