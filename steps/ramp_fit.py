"""Ramp fitting: ordinary least squares with optimal weighting (jwst's RampFitStep, OLS_C).

The kernel reproduces what stcal 1.20's C slope fitter computes for each pixel:

* each integration ramp is split into segments of consecutive good groups (a group is good
  when its group DQ, ignoring PERSISTENCE, is 0); a segment may start on the group flagged
  JUMP_DET alone that precedes it; one-group segments are dropped when a longer one exists,
  and only the first is kept when none does;
* each segment of three or more groups gets a weighted least-squares slope, the weights
  following the Fixsen et al. (2000) power law whose exponent is chosen by the segment S/N;
  two-group segments use the difference, one-group segments the group value over a time;
* segment Poisson variance comes from the pixel's median first-difference rate (plus the
  average dark current), the read-noise variance from the segment length;
* segments and integrations are combined by inverse read-noise variance (JP-4318).

Units: data DN, times s, slopes DN/s, variances (DN/s)^2, gain e-/DN, readnoise DN (the
reference as jwst passes it; the kernel applies stcal's ``gain / sqrt(2 nframes)`` scaling).
Arrays are C-ordered (nints, ngroups, ny, nx); kernels run on row chunks and are exact per pixel.
On the machine it was written on the output is bit-identical to stcal's (same float64 operation
order, float32 ``powf`` weights). Per row, pixels go in blocks of 128: integrations without any
group flag (most of them) are fitted vectorized across the block (medians by a sorting network,
one full-ramp segment, per-S/N-class weights); integrations with flags take a per-pixel path.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

import numba
import numpy as np

from . import dqflags

__all__ = [
    "RampFitParameters",
    "RampFitResult",
    "fit_ramps",
    "group_flag_all",
    "exposure_fit_plan",
    "first_last_group_mask",
]

_DNU = dqflags.DO_NOT_USE
_SAT = dqflags.SATURATED
_JUMP = dqflags.JUMP_DET
_PERS = dqflags.PIXEL["PERSISTENCE"]
_CLOSS = dqflags.CHARGELOSS
_NGV = dqflags.NO_GAIN_VALUE
_NOT_PERS = 0xFF & ~_PERS  # group DQ bits other than PERSISTENCE
_INVALID = _DNU | _SAT

#: Longest ramp (in first differences) whose clean pixels get the row-vectorized median.
_MAX_ROW_NETWORK = 64

#: stcal discards variances at or above this value (sets them to 0).
_LARGE_VARIANCE_THRESHOLD = 1.0e6

#: Fixsen power-law exponents, indexed by S/N class (see ``_snr_class``).
_POWERS = np.array([0.0, 0.4, 1.0, 3.0, 6.0, 10.0], dtype=np.float32)

# Step keywords of stpipe's base Step and jwst's JwstStep: accepted and ignored.
_GENERIC_STEP_KEYS = frozenset({
    "pre_hooks", "post_hooks", "output_file", "output_dir", "output_ext", "output_use_model",
    "output_use_index", "save_results", "skip", "suffix", "search_output_file", "input_dir",
    "name", "class",
})


# --------------------------------------------------------------------------------------------
# Parameters and result containers
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RampFitParameters:
    """RampFitStep parameters (jwst 3.0.0 names and defaults)."""

    algorithm: str = "OLS_C"
    weighting: str = "optimal"  # a class attribute in jwst, the only weighting stcal accepts
    suppress_one_group: bool = True
    firstgroup: int | None = None
    lastgroup: int | None = None
    maximum_cores: str = "1"  # accepted; the kernel is single-core by design
    save_opt: bool = False
    int_name: str = ""
    opt_name: str = ""

    def __post_init__(self) -> None:
        if self.algorithm.upper() != "OLS_C":
            raise NotImplementedError(
                f"ramp_fit algorithm {self.algorithm!r} is not implemented; only 'OLS_C' "
                "(the jwst default) is. The LIKELY algorithm would need stcal's likely_fit."
            )
        if self.weighting != "optimal":
            raise ValueError(f"weighting must be 'optimal' (stcal accepts nothing else), "
                             f"got {self.weighting!r}")
        if self.save_opt:
            raise NotImplementedError("save_opt=True (the 'fitopt' optional product) is not "
                                      "implemented")

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any]) -> "RampFitParameters":
        """Build from step parameters (e.g. a ``pars-rampfitstep`` dict or CLI overrides).

        Unknown keys raise ``ValueError``; generic stpipe keys (skip, output_dir, ...) are
        ignored. ``algorithm='LIKELY'`` and ``save_opt=True`` raise ``NotImplementedError``.
        """
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in params.items():
            if key in known:
                kwargs[key] = value
            elif key not in _GENERIC_STEP_KEYS:
                raise ValueError(f"unknown ramp_fit parameter {key!r}")
        for key in ("firstgroup", "lastgroup"):
            if kwargs.get(key) is not None:
                kwargs[key] = int(kwargs[key])
        if "maximum_cores" in kwargs:
            kwargs["maximum_cores"] = str(kwargs["maximum_cores"])
        for key in ("suppress_one_group", "save_opt"):
            if key in kwargs:
                kwargs[key] = _as_bool(kwargs[key])
        return cls(**kwargs)


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "t", "yes", "y", "1")
    return bool(value)


@dataclass
class RampFitResult:
    """Rate (exposure) and rateints (per integration) arrays.

    rate*: (ny, nx); ints_*: (nints, ny, nx). SCI in DN/s, variances in (DN/s)^2, ERR in DN/s,
    DQ uint32, everything else float32.
    """

    rate: np.ndarray
    rate_dq: np.ndarray
    rate_var_poisson: np.ndarray
    rate_var_rnoise: np.ndarray
    rate_err: np.ndarray
    ints_rate: np.ndarray
    ints_dq: np.ndarray
    ints_var_poisson: np.ndarray
    ints_var_rnoise: np.ndarray
    ints_err: np.ndarray

    @classmethod
    def empty(cls, nints: int, ny: int, nx: int,
              share_single_integration: bool = False) -> "RampFitResult":
        """Zero-filled output arrays for a (ny, nx) frame with ``nints`` integrations.

        share_single_integration: for nints == 1, make ``rate``, ``rate_dq`` and
        ``rate_var_poisson`` views of ``ints_*[0]`` (saves 3 * 4 bytes per pixel: 48 MB on a
        2048x2048 frame). For one integration stcal's SCI, DQ and VAR_POISSON are always equal
        to the rateints ones, bit for bit; VAR_RNOISE (with CHARGELOSS) and ERR are not, so
        they stay separate arrays. Ignored for nints > 1.
        """
        f2 = lambda: np.zeros((ny, nx), dtype=np.float32)  # noqa: E731
        f3 = lambda: np.zeros((nints, ny, nx), dtype=np.float32)  # noqa: E731
        ints_rate, ints_var_poisson = f3(), f3()
        ints_dq = np.zeros((nints, ny, nx), dtype=np.uint32)
        if share_single_integration and nints == 1:
            rate, rate_dq, rate_var_poisson = ints_rate[0], ints_dq[0], ints_var_poisson[0]
        else:
            rate, rate_dq, rate_var_poisson = f2(), np.zeros((ny, nx), dtype=np.uint32), f2()
        return cls(
            rate=rate, rate_dq=rate_dq, rate_var_poisson=rate_var_poisson,
            rate_var_rnoise=f2(), rate_err=f2(),
            ints_rate=ints_rate, ints_dq=ints_dq, ints_var_poisson=ints_var_poisson,
            ints_var_rnoise=f3(), ints_err=f3(),
        )

    @property
    def shares_single_integration(self) -> bool:
        """Whether rate, rate_dq and rate_var_poisson are views of the ints_* arrays."""
        return np.may_share_memory(self.rate, self.ints_rate)


# --------------------------------------------------------------------------------------------
# Exposure-level decisions (need the whole frame; the driver accumulates them over chunks)
# --------------------------------------------------------------------------------------------

def first_last_group_mask(ngroups: int, firstgroup: int | None, lastgroup: int | None) -> np.ndarray:
    """Groups that jwst flags DO_NOT_USE for ``firstgroup``/``lastgroup``, as bool (ngroups,).

    Follows jwst's ``set_groupdq``: negative firstgroup means 0; firstgroup >= lastgroup means
    the selectors are ignored; a lastgroup beyond the ramp flags nothing.
    """
    mask = np.zeros(ngroups, dtype=bool)
    if firstgroup is None and lastgroup is None:
        return mask
    first = 0 if firstgroup is None else max(int(firstgroup), 0)
    last = ngroups - 1 if lastgroup is None else int(lastgroup)
    if first >= last:
        return mask
    mask[:first] = True
    if last < ngroups - 1:
        mask[last + 1:] = True
    return mask


def group_flag_all(gdq: np.ndarray, params: RampFitParameters) -> tuple[np.ndarray, np.ndarray]:
    """Per group, whether DO_NOT_USE / SATURATED is set for every integration and pixel.

    gdq: uint8 (nints, ngroups, ny, nx), a row chunk of the exposure. The flags are taken as
    stcal sees them: after jwst's firstgroup/lastgroup flagging and one-good-group suppression.
    Returns (all_dnu, all_sat), bool (ngroups,) each; AND them over all chunks of the exposure
    and pass the result to ``exposure_fit_plan``.
    """
    ngroups = gdq.shape[1]
    extra = first_last_group_mask(ngroups, params.firstgroup, params.lastgroup)
    suppress = bool(params.suppress_one_group) and ngroups > 1
    all_dnu = np.ones(ngroups, dtype=np.bool_)
    all_sat = np.ones(ngroups, dtype=np.bool_)
    _compiled("flag_all")(np.asarray(gdq, dtype=np.uint8), extra, suppress, all_dnu, all_sat)
    return all_dnu, all_sat


def exposure_fit_plan(all_dnu: np.ndarray, all_sat: np.ndarray, instrument: str) -> tuple[int, int] | None:
    """The group range stcal fits, or None when it returns no rate/rateints products.

    all_dnu / all_sat: bool (ngroups,) from ``group_flag_all`` over the whole exposure.
    For MIRI (ngroups > 1) stcal drops the leading groups that are DO_NOT_USE everywhere and
    the last group if it is; fewer than 2 groups left means no products. For every
    instrument, no products when the first fitted group is saturated everywhere.
    Pass the returned range to ``fit_ramps(group_range=...)``.
    """
    ngroups = len(all_dnu)
    first, end = 0, ngroups
    if instrument.upper() == "MIRI" and ngroups > 1:
        while first < ngroups and all_dnu[first]:
            first += 1
        if first == ngroups:
            return None
        if all_dnu[ngroups - 1]:
            end -= 1
            if end - first < 1:
                return None
        if end - first < 2:
            return None
    if all_sat[first]:
        return None
    return first, end


# --------------------------------------------------------------------------------------------
# Numba kernels
# --------------------------------------------------------------------------------------------
# Each kernel is compiled once, for the explicit signature at the end of this section: inputs
# are typed as read-only arrays of any layout, so row-chunk views, read-only and broadcast
# arrays all share the same machine code (and the same on-disk cache entry); the outputs are
# C-contiguous (as RampFitResult.empty makes them), which lets LLVM vectorize their stores.
# Helpers of the per-pixel path are inlined at numba IR level (each has one call site there):
# ~25% faster for flagged pixels, at no measurable compile-time cost.

_JIT = dict(cache=True, nogil=True, error_model="numpy")


@numba.njit(**_JIT)
def _group_flag_all_kernel(gdq, extra_dnu, suppress, all_dnu, all_sat):
    """AND, per group, of DO_NOT_USE / SATURATED over a chunk (in place on all_dnu/all_sat)."""
    nints, ngroups, ny, nx = gdq.shape
    for i in range(nints):
        for y in range(ny):
            for x in range(nx):
                supp = False
                if suppress:
                    ngood = 0
                    for g in range(ngroups):
                        if not extra_dnu[g] and (gdq[i, g, y, x] & _NOT_PERS) == 0:
                            ngood += 1
                    supp = ngood == 1
                for g in range(ngroups):
                    v = gdq[i, g, y, x]
                    if not (supp or extra_dnu[g] or (v & _DNU)):
                        all_dnu[g] = False
                    if not (v & _SAT):
                        all_sat[g] = False


@numba.njit(**_JIT)
def _weight_table_kernel(ngroups: int) -> np.ndarray:
    """Optimal weights |(k - mid)/mid| ** p in float32 (as powf), shape (6, ngroups+1, ngroups)."""
    tab = np.zeros((6, ngroups + 1, ngroups), dtype=np.float32)
    for ip in range(6):
        p = _POWERS[ip]
        for length in range(3, ngroups + 1):
            mid = (length - 1) / 2.0
            invmid = 1.0 / mid
            for k in range(length):
                w = np.float32(abs((k - mid) * invmid))
                tab[ip, length, k] = w ** p
    return tab


def _batcher_pairs(n: int) -> list[tuple[int, int]]:
    """Compare-exchange pairs (i < j) of Batcher's odd-even merge sort for n values: the
    network for the next power of two, minus the comparators that touch padding."""
    size = 1
    while size < n:
        size *= 2
    pairs = []
    t = 1
    while t < size:
        k = t
        while k >= 1:
            j = k % t
            while j + k < size:
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * t) == (i + j + k) // (2 * t):
                        pairs.append((i + j, i + j + k))
                j += 2 * k
            k //= 2
        t *= 2
    return [(a, b) for a, b in pairs if b < n]


@functools.lru_cache(maxsize=16)
def _sorting_network(n: int) -> np.ndarray:
    """int64 (npairs, 2) network sorting n values, used row-wide for clean ramps; empty (the
    kernel then uses its per-pixel path) for n < 2 or n > _MAX_ROW_NETWORK."""
    if n < 2 or n > _MAX_ROW_NETWORK:
        pairs = np.zeros((0, 2), dtype=np.int64)
    else:
        pairs = np.array(_batcher_pairs(n), dtype=np.int64)
    pairs.setflags(write=False)
    return pairs


@functools.lru_cache(maxsize=16)
def _median_network(n: int) -> np.ndarray:
    """``_sorting_network(n)`` without the comparators that cannot move a value into the
    middle position(s) n//2 (and n//2 - 1 for even n): all the row-wise median needs."""
    pairs = _sorting_network(n)
    if len(pairs) == 0:
        return pairs
    need = {n >> 1} | ({(n >> 1) - 1} if n % 2 == 0 else set())
    kept = []
    for a, b in pairs[::-1]:
        if a in need or b in need:
            kept.append((a, b))
            need |= {int(a), int(b)}
    out = np.array(kept[::-1], dtype=np.int64)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=16)
def _weight_table(ngroups: int) -> np.ndarray:
    tab = _weight_table_kernel(max(ngroups, 1))
    tab.setflags(write=False)
    return tab


@numba.njit(**_JIT)
def _snr_class(snr: float) -> int:
    """S/N class selecting the Fixsen exponent (NaN falls into the top class, as in stcal)."""
    if snr < 5.0:
        return 0
    if snr < 10.0:
        return 1
    if snr < 20.0:
        return 2
    if snr < 50.0:
        return 3
    if snr < 100.0:
        return 4
    return 5


@numba.njit(inline="always", **_JIT)
def _find_segments(q, base, ngroups, starts, ends) -> int:
    """Segments [start, end) of one integration's group DQ ``q[base:base+ngroups]``.

    Good groups have no flag other than PERSISTENCE; a segment may start on a preceding group
    flagged JUMP_DET alone. Keeps every segment longer than one group, or else only the first.
    Returns the number of segments written to ``starts``/``ends``.
    """
    nseg = 0
    maxlen = 0
    in_seg = False
    start = 0
    for k in range(ngroups + 1):
        closing = k == ngroups
        good = False
        if not closing:
            good = (q[base + k] & _NOT_PERS) == 0
        if good:
            if not in_seg:
                if k > 0 and (q[base + k - 1] & _NOT_PERS) == _JUMP:
                    start = k - 1
                else:
                    start = k
                in_seg = True
        elif in_seg:
            length = k - start
            in_seg = False
            if length == 1 and maxlen > 1:
                continue
            starts[nseg] = start
            ends[nseg] = k
            nseg += 1
            if length > maxlen:
                maxlen = length
    if nseg < 2:
        return nseg
    if maxlen < 2:
        return 1
    kept = 0
    for s in range(nseg):
        if ends[s] - starts[s] > 1:
            starts[kept] = starts[s]
            ends[kept] = ends[s]
            kept += 1
    return kept


@numba.njit(**_JIT)
def _sort8(v, n):  # noqa: PLR0915
    """Sort ``v[:n]`` (n <= 8, no NaN) in place: Batcher odd-even merge network of
    19 compare-exchanges on registers, padded with +inf (writes ``v[:8]``)."""
    a0 = v[0] if n > 0 else np.inf
    a1 = v[1] if n > 1 else np.inf
    a2 = v[2] if n > 2 else np.inf
    a3 = v[3] if n > 3 else np.inf
    a4 = v[4] if n > 4 else np.inf
    a5 = v[5] if n > 5 else np.inf
    a6 = v[6] if n > 6 else np.inf
    a7 = v[7] if n > 7 else np.inf
    a0, a1 = min(a0, a1), max(a0, a1)
    a2, a3 = min(a2, a3), max(a2, a3)
    a4, a5 = min(a4, a5), max(a4, a5)
    a6, a7 = min(a6, a7), max(a6, a7)
    a0, a2 = min(a0, a2), max(a0, a2)
    a1, a3 = min(a1, a3), max(a1, a3)
    a4, a6 = min(a4, a6), max(a4, a6)
    a5, a7 = min(a5, a7), max(a5, a7)
    a1, a2 = min(a1, a2), max(a1, a2)
    a5, a6 = min(a5, a6), max(a5, a6)
    a0, a4 = min(a0, a4), max(a0, a4)
    a1, a5 = min(a1, a5), max(a1, a5)
    a2, a6 = min(a2, a6), max(a2, a6)
    a3, a7 = min(a3, a7), max(a3, a7)
    a2, a4 = min(a2, a4), max(a2, a4)
    a3, a5 = min(a3, a5), max(a3, a5)
    a1, a2 = min(a1, a2), max(a1, a2)
    a3, a4 = min(a3, a4), max(a3, a4)
    a5, a6 = min(a5, a6), max(a5, a6)
    v[0] = a0
    v[1] = a1
    v[2] = a2
    v[3] = a3
    v[4] = a4
    v[5] = a5
    v[6] = a6
    v[7] = a7


@numba.njit(**_JIT)
def _shell_sort(v, n) -> None:
    """Sort ``v[:n]`` in place (Shell sort, Ciura gaps): long ramps, compact machine code."""
    for gap in (701, 301, 132, 57, 23, 10, 4, 1):
        if gap >= n:
            continue
        for i in range(gap, n):
            t = v[i]
            j = i
            while j >= gap and v[j - gap] > t:
                v[j] = v[j - gap]
                j -= gap
            v[j] = t


@numba.njit(inline="always", **_JIT)
def _median(vals, n) -> float:
    """Median of ``vals[:n]`` (no NaN; len(vals) >= 8); NaN for n == 0. Reorders ``vals``."""
    if n == 0:
        return np.nan
    if n == 1:
        return vals[0]
    if n == 2:
        return (vals[0] + vals[1]) / 2.0
    if n <= 8:
        _sort8(vals, n)
    else:
        _shell_sort(vals, n)
    m = n >> 1
    if n & 1:
        return vals[m]
    return (vals[m] + vals[m - 1]) / 2.0


@numba.njit(inline="always", **_JIT)
def _int_median_rate(d, q, base, ngroups, clean, is0th, iszf, group_time, frame_time,
                     one_group_time, scratch) -> float:
    """Median first difference (DN/s) of one integration's usable groups, ``ngroups`` >= 2
    (stcal's rule, incl. its special cases); 0 when there is none.

    d: float64 data from ``base`` (NaN where saturated); q: the group DQ; clean: no group of
    the integration is flagged; is0th / iszf: its one good group is the zeroth / ZEROFRAME.
    """
    if is0th:
        mrate = d[base] / one_group_time
    elif iszf:
        mrate = d[base] / frame_time
    else:
        n = 0
        if clean:
            prev = d[base] / group_time
            loc0 = prev
            for k in range(1, ngroups):
                cur = d[base + k] / group_time
                diff = cur - prev
                scratch[n] = diff
                n += not math.isnan(diff)
                prev = cur
        else:
            prev = np.nan if (q[base] & _DNU) else d[base] / group_time
            loc0 = prev
            for k in range(1, ngroups):
                cur = np.nan if (q[base + k] & _DNU) else d[base + k] / group_time
                diff = cur - prev
                scratch[n] = diff
                n += not (math.isnan(diff) or (q[base + k] & _JUMP))
                prev = cur
        if n == 0 and not math.isnan(loc0):
            scratch[0] = loc0
            n = 1
        mrate = _median(scratch, n)
    return 0.0 if math.isnan(mrate) else mrate


@numba.njit(**_JIT)
def _poisson_var(median_rate, dark, pden) -> float:
    if median_rate > 0.0:
        return (median_rate + dark) / pden
    return dark / pden


@numba.njit(**_JIT)
def _rnoise_var_short(rn, timing, gain) -> float:
    """Read-noise variance of a one- or two-group segment ((DN/s)^2)."""
    rnum = rn / timing
    rnum = 12.0 * rnum * rnum
    rden = 6.0 * gain * gain
    return rnum / rden


@numba.njit(**_JIT)
def _rnoise_var_long(rn, group_time, gain, seglen) -> float:
    """Read-noise variance of a segment of ``seglen`` >= 3 groups ((DN/s)^2)."""
    if gain <= 0.0 or math.isnan(gain):
        return 0.0
    rnum = rn / group_time
    rnum = 12.0 * rnum * rnum
    rden = seglen * seglen * seglen - seglen
    rden = rden * gain * gain
    return rnum / rden


@numba.njit(inline="always", **_JIT)
def _fit_segment(d, base, start, length, rn, gain, dark, median_rate, timing1, group_time,
                 wtab, out):
    """Fit one segment; out[:] = (slope DN/s, var_poisson, var_rnoise)."""
    idx = base + start
    if length == 1:
        out[0] = d[idx] / timing1
        out[1] = _poisson_var(median_rate, dark, timing1 * gain)
        out[2] = _rnoise_var_short(rn, timing1, gain)
        return
    if length == 2:
        out[0] = (d[idx + 1] - d[idx]) / group_time
        out[1] = _poisson_var(median_rate, dark, group_time * gain)
        out[2] = _rnoise_var_short(rn, group_time, gain)
        return
    # S/N of the segment picks the weighting exponent
    signal = d[idx + length - 1] - d[idx]
    den = rn * rn + signal * gain
    if den <= 0.0 or gain == 0.0:
        snr = 0.0
    else:
        s = signal * gain / math.sqrt(den)
        snr = 0.0 if s < 0.0 else s
    ip = _snr_class(snr)
    invrn2 = 1.0 / (rn * rn)
    sumw = 0.0
    sumx = 0.0
    sumxx = 0.0
    sumy = 0.0
    sumxy = 0.0
    for k in range(length):
        w = np.float64(wtab[ip, length, k]) * invrn2
        x = np.float64(k + start)
        y = d[idx + k]
        if math.isnan(y):
            y = 0.0
        xw = x * w
        sumw += w
        sumx += xw
        sumxx += x * xw
        sumy += y * w
        sumxy += y * xw
    den = sumw * sumxx - sumx * sumx
    num = sumw * sumxy - sumx * sumy
    out[0] = (num * (1.0 / den)) / group_time
    seglen = np.float64(length)
    out[1] = _poisson_var(median_rate, dark, group_time * gain * (seglen - 1.0))
    out[2] = _rnoise_var_long(rn, group_time, gain, seglen)


@numba.njit(inline="always", **_JIT)
def _prep_int(rowg, rowq, zeroframe, has_zf, suppress, g0, ng, i, y, x, d, q, oq):
    """Group DQ statistics and data of integration ``i`` of pixel ``x`` (row ``y``).

    rowg/rowq: the row's data and group DQ (firstgroup/lastgroup DO_NOT_USE included) from
    ``_gather_row``. Fills d (float64: data, NaN where saturated, ZEROFRAME substituted), q (the
    DQ as stcal sees it: one-good-group suppression, JUMP_DET cleared on a trimmed ramp's first
    group) and oq (the DQ as given) at ``i * ng``; q and oq are not written for clean ramps.
    Returns (clean, cnt_dnu_sat, cnt_sat, jump|pers bits, has CHARGELOSS, is0th, iszf).
    """
    base = i * ng
    orr = 0
    ngood = 0
    for k in range(ng):
        v8 = rowq[base + k, x]
        orr |= v8
        ngood += (v8 & _NOT_PERS) == 0
    supp = suppress and ngood == 1
    cg = 0
    cd = 0
    cds = 0
    cs = 0
    bits = 0
    clean = orr == 0 and not supp
    if clean:
        for k in range(ng):
            d[base + k] = np.float64(rowg[base + k, x])
        cg = ng
    else:
        for k in range(ng):
            v = np.uint32(rowq[base + k, x])
            oq[base + k] = v
            if supp:
                v |= np.uint32(_DNU)
            if k == 0 and g0 > 0:
                v &= np.uint32(~_JUMP & 0xFF)
            q[base + k] = v
            bits |= v
            cg += v == 0
            cd += (v != 0) & ((v & _DNU) != 0)
            cds += (v & _INVALID) != 0
            sat = (v & _SAT) != 0
            cs += sat
            d[base + k] = np.nan if sat else np.float64(rowg[base + k, x])
    is0th = False
    iszf = False
    if not suppress:
        if cg == 1 and (clean or q[base] == 0):
            is0th = True
        elif cg == 0 and has_zf:
            zf = np.float64(zeroframe[i, y, x])
            if zf != 0.0:
                d[base] = zf
                q[base] = 0
                cg = 1
                cds -= 1
                if cs == ng:
                    cs -= 1
                if cd == ng:
                    cd -= 1
                iszf = True
                clean = False
    closs = (bits & _CLOSS) != 0
    return clean, cds, cs, np.uint32(bits & (_JUMP | _PERS)), closs, is0th, iszf


@numba.njit(inline="always", **_JIT)
def _int_dq(clean, q0, cds, cs, ng, dq):
    """DQ of an integration before and after its partial-saturation flag.

    dq: pixel DQ | the integration's JUMP_DET/PERSISTENCE bits; q0: its first group's DQ.
    Returns (dq counted for the exposure's all-DO_NOT_USE / all-SATURATED tests, final dq).
    """
    if not clean and (q0 & _SAT):  # saturated from the first group
        dq |= np.uint32(_DNU | _SAT)
    if cds == ng:
        dq |= np.uint32(_DNU)
        if cs == ng:
            dq |= np.uint32(_SAT)
    return dq, dq | np.uint32(_SAT) if cs > 0 else dq


@numba.njit(inline="always", **_JIT)
def _int_terms(inv_r, inv_p, inv_e, num, dq):
    """An integration's results from its segments' sums of 1/var_rnoise, 1/var_poisson (over
    segments with var_poisson > 0), 1/(var_poisson + var_rnoise) and slope/var_rnoise.

    Returns (slope, var_poisson, var_rnoise, err) and its terms of the exposure sums
    (1/var_poisson or 0, 1/var_rnoise, slope/var_rnoise). dq: the integration's DQ.
    """
    thr = _LARGE_VARIANCE_THRESHOLD
    ivp = 1.0 / inv_p if inv_p > 0.0 else 0.0
    if ivp >= thr:
        ivp = 0.0
    ivr = 1.0 / inv_r
    if ivr >= thr:
        ivr = 0.0
    if dq & _INVALID:
        return np.nan, 0.0, 0.0, 0.0, inv_p, inv_r, num
    var_e = 1.0 / inv_e
    ierr = 0.0 if var_e > thr else math.sqrt(var_e)
    return num * ivr, ivp, ivr, ierr, inv_p, inv_r, num


@numba.njit(inline="always", **_JIT)
def _fit_int(d, q, base, ng, clean, cds, dq, mrate, rn, gn, dc, timing1, group_time, wtab,
             starts, ends, seg):
    """Fit one integration: its segments combined by inverse read-noise variance.

    dq: the integration's DQ (first value of ``_int_dq``). Returns what ``_int_terms`` does
    (0 and no terms when the integration has no usable segment).
    """
    if not clean and (q[base] & _SAT):
        nseg = 0
    elif clean:
        starts[0] = 0
        ends[0] = ng
        nseg = 1
    else:
        nseg = _find_segments(q, base, ng, starts, ends)
    if cds == ng or nseg == 0:
        return (np.nan if dq & _INVALID else 0.0), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    inv_r = 0.0
    inv_p = 0.0
    inv_e = 0.0
    num = 0.0
    for s in range(nseg):
        _fit_segment(d, base, starts[s], ends[s] - starts[s], rn, gn, dc, mrate, timing1,
                     group_time, wtab, seg)
        inv_r += 1.0 / seg[2]
        if seg[1] > 0.0:
            inv_p += 1.0 / seg[1]
        inv_e += 1.0 / (seg[1] + seg[2])
        num += seg[0] / seg[2]
    return _int_terms(inv_r, inv_p, inv_e, num, dq)


@numba.njit(**_JIT)
def _timing1(is0th, iszf, suppress, group_time, frame_time, one_group_time) -> float:
    """Time (s) of a one-group segment's group."""
    if is0th and not suppress:
        return one_group_time
    if iszf and not suppress:
        return frame_time
    return group_time


@numba.njit(**_JIT)
def _chargeloss_update(oq, nints, ng, has_closs, is0th, iszf, suppress, rn, gain, group_time,
                       frame_time, one_group_time, starts, ends, ivr, r_vr) -> float:
    """stcal's CHARGELOSS pass for one pixel: the read-noise variance of each integration with
    CHARGELOSS groups is recomputed from its segments with those groups restored (``ivr``
    updated in place); returns the new exposure read-noise variance (slopes, ERR unchanged)."""
    thr = _LARGE_VARIANCE_THRESHOLD
    evar_r = 0.0
    for i in range(nints):
        if not has_closs[i]:
            if ivr[i] > 0.0:
                evar_r += 1.0 / ivr[i]
            continue
        timing1 = _timing1(is0th[i], iszf[i], suppress, group_time, frame_time, one_group_time)
        inv_r = _chargeloss_rnoise(oq, i * ng, ng, rn, gain, timing1, group_time, starts, ends)
        ivr[i] = 1.0 / inv_r
        if ivr[i] >= thr:
            ivr[i] = 0.0
        evar_r += inv_r
    if evar_r > 0.0:
        r_vr = 1.0 / evar_r
    if r_vr >= thr:
        r_vr = 0.0
    return r_vr


@numba.njit(**_JIT)
def _chargeloss_rnoise(oq, base, ngroups, rn, gain, timing1, group_time, starts, ends) -> float:
    """Inverse read-noise variance of an integration re-segmented with CHARGELOSS groups
    restored (stcal toggles DO_NOT_USE|CHARGELOSS on them). Modifies ``oq`` in place."""
    toggle = _DNU | _CLOSS
    for k in range(ngroups):
        if oq[base + k] & _CLOSS:
            oq[base + k] ^= toggle
    nseg = _find_segments(oq, base, ngroups, starts, ends)
    invvar_r = 0.0
    for s in range(nseg):
        length = ends[s] - starts[s]
        if length == 1:
            svar = _rnoise_var_short(rn, timing1, gain)
        elif length == 2:
            svar = _rnoise_var_short(rn, group_time, gain)
        else:
            svar = _rnoise_var_long(rn, group_time, gain, np.float64(length))
        if svar > 0.0:
            invvar_r += 1.0 / svar
    return invvar_r


# --- Row blocks ---------------------------------------------------------------------------
# Pixels are processed in blocks of _BLK columns. Every per-pixel quantity of a block lives in
# one flat float64 scratch array at a compile-time constant offset (field * _BLK), so that LLVM
# can prove the loops over a block free of aliasing and vectorize them across pixels.

_BLK = 128
(_F_RN, _F_GN, _F_DC, _F_INV2, _F_RATE, _F_MRATE, _F_PZ, _F_SNR, _F_SW, _F_SX, _F_SXX,
 _F_SY, _F_SXY, _F_SLOPE, _F_VR, _F_CP, _F_CR, _F_CN, _F_AVP, _F_AVR, _F_ANUM, _F_ISLOPE,
 _F_IVP, _F_IVR, _F_IERR, _F_RSLOPE, _F_RVP, _F_RVR, _F_RERR) = range(29)
_NFIELDS = 29


@numba.njit(**_JIT)
def _gather_row(data, gdq, y, g0, ng, extra8, rowg, rowq, qor) -> None:
    """Copy row ``y`` of every integration's groups g0..g0+ng-1 to ``rowg`` (nints*ng, nx),
    float32, and their group DQ, with the firstgroup/lastgroup DO_NOT_USE added, to ``rowq``
    (same shape, uint8); OR each pixel's group DQ into ``qor`` (nx,)."""
    nints = data.shape[0]
    nx = data.shape[3]
    for x in range(nx):
        qor[x] = 0
    for i in range(nints):
        for k in range(ng):
            src = data[i, g0 + k, y]
            dst = rowg[i * ng + k]
            for x in range(nx):
                dst[x] = src[x]
            qsrc = gdq[i, g0 + k, y]
            qdst = rowq[i * ng + k]
            e = extra8[k]
            for x in range(nx):
                v = qsrc[x] | e
                qdst[x] = v
                qor[x] |= v


@numba.njit(**_JIT)
def _block_pixel_params(pdq, readnoise, gain, dark, y, x0, nb, rn_scale, sf, pq) -> None:
    """Per-pixel scaled read noise, gain, dark current, 1/rn^2 and pixel DQ of a block."""
    x0 = max(x0, 0)  # (tells LLVM that indices are not negative: no wraparound selects)
    for j in range(nb):
        sf[_F_GN * _BLK + j] = gain[y, x0 + j]
        sf[_F_RN * _BLK + j] = readnoise[y, x0 + j]
        sf[_F_DC * _BLK + j] = dark[y, x0 + j]
        pq[j] = pdq[y, x0 + j]
    for j in range(nb):
        gn = sf[_F_GN * _BLK + j]
        bad = (gn <= 0.0) | math.isnan(gn)
        pq[j] |= np.uint32(_DNU | _NGV) if bad else np.uint32(0)
        # stcal scales the readnoise in float32: rn * gain / sqrt(2 nframes)
        rn = np.float64(np.float32(sf[_F_RN * _BLK + j] * (gn / rn_scale)))
        sf[_F_RN * _BLK + j] = rn
        sf[_F_INV2 * _BLK + j] = 1.0 / (rn * rn)


@numba.njit(**_JIT)
def _block_clean_median_rates(rowg, nints, ng, x0, nb, group_time, pairs, r, sf, imed,
                              ipois) -> None:
    """Median rates of a block's pixels computed as if no group were flagged.

    Vectorized across the block (the common case: most ramps carry no flag). rowg: float32
    (nints*ng, nx) group-major row data; pairs: ``_median_network(ng - 1)``; r: float64
    scratch (ng*_BLK,). Writes, per integration i, imed[i*_BLK + j] = the median first
    difference (DN/s) of pixel x0+j and ipois[i*_BLK + j] = whether a difference is not finite
    (the integration then needs the per-pixel path); and sf[_F_RATE] = their sum over the
    integrations, NaN when any is not finite.
    """
    x0 = max(x0, 0)  # (tells LLVM that indices are not negative: no wraparound selects)
    n = max(ng - 1, 1)
    m = n >> 1
    o = _F_RATE * _BLK
    z = _F_PZ * _BLK
    for j in range(nb):
        sf[o + j] = 0.0
    for i in range(nints):
        for k in range(ng):
            src = rowg[i * ng + k]
            rk = k * _BLK
            for j in range(nb):
                r[rk + j] = np.float64(src[x0 + j]) / group_time
        for j in range(nb):
            sf[z + j] = 0.0
        for k in range(n):
            rk = k * _BLK
            for j in range(nb):
                diff = r[rk + _BLK + j] - r[rk + j]
                r[rk + j] = diff
                sf[z + j] += diff * 0.0  # NaN (or inf) poisons the sum, else adds a zero
        for c in range(pairs.shape[0]):
            # (max(., 0) tells LLVM the row offsets are not negative: no wraparound selects)
            ra = max(pairs[c, 0], 0) * _BLK
            rb = max(pairs[c, 1], 0) * _BLK
            for j in range(nb):
                a = r[ra + j]
                b = r[rb + j]
                swap = b < a
                # "+ 0.0" keeps LLVM from turning the store into a (slow) masked store; it
                # only turns -0.0 into +0.0, which cannot change a median rate sum
                r[ra + j] = (b if swap else a) + 0.0
                r[rb + j] = a if swap else b
        rm = m * _BLK
        io = i * _BLK
        if n & 1:
            for j in range(nb):
                imed[io + j] = r[rm + j]
        else:
            for j in range(nb):
                imed[io + j] = (r[rm + j] + r[rm - _BLK + j]) / 2.0
        for j in range(nb):
            pz = sf[z + j]
            ipois[io + j] = math.isnan(pz)
            sf[o + j] += pz
            sf[o + j] += imed[io + j]


@numba.njit(**_JIT)
def _block_fit_clean(rowg, i, ng, x0, nb, group_time, wfast, sf, pq) -> None:
    """Fit integration ``i`` of every pixel of a block as one unflagged segment of all ``ng``
    (>= 3) groups, vectorized across the block: stcal's OLS_C for a ramp without flags.

    wfast: float64 (6*ng,) optimal weights per S/N class.
    sf[_F_MRATE] holds the median rates. Writes the integration's slope and
    variances to sf[_F_ISLOPE.._F_IERR], its terms of the exposure sums (1/var_poisson,
    1/var_rnoise, slope/var_rnoise) to sf[_F_CP], sf[_F_CR], sf[_F_CN], and the segment's
    slope and read-noise variance to sf[_F_SLOPE], sf[_F_VR].
    """
    thr = _LARGE_VARIANCE_THRESHOLD
    x0 = max(x0, 0)  # (tells LLVM that indices are not negative: no wraparound selects)
    base = i * ng
    first = rowg[base]
    last = rowg[base + ng - 1]
    # S/N of the ramp picks the weighting exponent
    for j in range(nb):
        rn = sf[_F_RN * _BLK + j]
        gn = sf[_F_GN * _BLK + j]
        signal = np.float64(last[x0 + j]) - np.float64(first[x0 + j])
        den = rn * rn + signal * gn
        s = signal * gn / math.sqrt(den)
        s = 0.0 if s < 0.0 else s
        sf[_F_SNR * _BLK + j] = 0.0 if (den <= 0.0) | (gn == 0.0) else s
    # optimal weights (per S/N class) and the weighted sums, accumulated over the groups in
    # stcal's order
    for j in range(nb):
        sf[_F_SW * _BLK + j] = 0.0
        sf[_F_SX * _BLK + j] = 0.0
        sf[_F_SXX * _BLK + j] = 0.0
        sf[_F_SY * _BLK + j] = 0.0
        sf[_F_SXY * _BLK + j] = 0.0
    # (two groups per pass over the block: half the accumulator traffic, same addition order)
    for k in range(0, ng - 1, 2):
        w0 = wfast[k]
        w1 = wfast[ng + k]
        w2 = wfast[2 * ng + k]
        w3 = wfast[3 * ng + k]
        w4 = wfast[4 * ng + k]
        w5 = wfast[5 * ng + k]
        v0 = wfast[k + 1]
        v1 = wfast[ng + k + 1]
        v2 = wfast[2 * ng + k + 1]
        v3 = wfast[3 * ng + k + 1]
        v4 = wfast[4 * ng + k + 1]
        v5 = wfast[5 * ng + k + 1]
        xa = np.float64(k)
        xb = np.float64(k + 1)
        ya = rowg[base + k]
        yb = rowg[base + k + 1]
        for j in range(nb):
            snr = sf[_F_SNR * _BLK + j]
            inv2 = sf[_F_INV2 * _BLK + j]
            ca = snr < 5.0
            cb = snr < 10.0
            cc = snr < 20.0
            cd = snr < 50.0
            ce = snr < 100.0
            # NaN S/N falls into the top class, as in stcal
            wa = w5
            wa = w4 if ce else wa
            wa = w3 if cd else wa
            wa = w2 if cc else wa
            wa = w1 if cb else wa
            wa = w0 if ca else wa
            wb = v5
            wb = v4 if ce else wb
            wb = v3 if cd else wb
            wb = v2 if cc else wb
            wb = v1 if cb else wb
            wb = v0 if ca else wb
            wa = wa * inv2
            wb = wb * inv2
            ja = np.float64(ya[x0 + j])
            jb = np.float64(yb[x0 + j])
            xwa = xa * wa
            xwb = xb * wb
            sf[_F_SW * _BLK + j] += wa
            sf[_F_SW * _BLK + j] += wb
            sf[_F_SX * _BLK + j] += xwa
            sf[_F_SX * _BLK + j] += xwb
            sf[_F_SXX * _BLK + j] += xa * xwa
            sf[_F_SXX * _BLK + j] += xb * xwb
            sf[_F_SY * _BLK + j] += ja * wa
            sf[_F_SY * _BLK + j] += jb * wb
            sf[_F_SXY * _BLK + j] += ja * xwa
            sf[_F_SXY * _BLK + j] += jb * xwb
    if ng & 1:
        k = ng - 1
        w0 = wfast[k]
        w1 = wfast[ng + k]
        w2 = wfast[2 * ng + k]
        w3 = wfast[3 * ng + k]
        w4 = wfast[4 * ng + k]
        w5 = wfast[5 * ng + k]
        xa = np.float64(k)
        ya = rowg[base + k]
        for j in range(nb):
            snr = sf[_F_SNR * _BLK + j]
            wt = w5
            wt = w4 if snr < 100.0 else wt
            wt = w3 if snr < 50.0 else wt
            wt = w2 if snr < 20.0 else wt
            wt = w1 if snr < 10.0 else wt
            wt = w0 if snr < 5.0 else wt
            wt = wt * sf[_F_INV2 * _BLK + j]
            ja = np.float64(ya[x0 + j])
            xw = xa * wt
            sf[_F_SW * _BLK + j] += wt
            sf[_F_SX * _BLK + j] += xw
            sf[_F_SXX * _BLK + j] += xa * xw
            sf[_F_SY * _BLK + j] += ja * wt
            sf[_F_SXY * _BLK + j] += ja * xw
    seglen = np.float64(ng)
    rden0 = seglen * seglen * seglen - seglen
    for j in range(nb):
        gn = sf[_F_GN * _BLK + j]
        rn = sf[_F_RN * _BLK + j]
        dc = sf[_F_DC * _BLK + j]
        sumw = sf[_F_SW * _BLK + j]
        sumx = sf[_F_SX * _BLK + j]
        den = sumw * sf[_F_SXX * _BLK + j] - sumx * sumx
        num = sumw * sf[_F_SXY * _BLK + j] - sumx * sf[_F_SY * _BLK + j]
        slope = (num * (1.0 / den)) / group_time
        mrate = sf[_F_MRATE * _BLK + j]
        pden = group_time * gn * (seglen - 1.0)
        var_p = (mrate + dc) / pden if mrate > 0.0 else dc / pden
        rnum = rn / group_time
        rnum = 12.0 * rnum * rnum
        var_r = rnum / (rden0 * gn * gn)
        var_r = 0.0 if (gn <= 0.0) | math.isnan(gn) else var_r
        inv_r = 0.0 + 1.0 / var_r
        inv_p = 0.0 + 1.0 / var_p if var_p > 0.0 else 0.0
        inv_e = 0.0 + 1.0 / (var_p + var_r)
        wslope = 0.0 + slope / var_r
        ivp = 1.0 / inv_p if inv_p > 0.0 else 0.0
        ivp = 0.0 if ivp >= thr else ivp
        ivr = 1.0 / inv_r
        ivr = 0.0 if ivr >= thr else ivr
        var_e = 1.0 / inv_e
        invalid = (pq[j] & np.uint32(_INVALID)) != 0
        sf[_F_ISLOPE * _BLK + j] = np.nan if invalid else wslope * ivr
        sf[_F_IVP * _BLK + j] = 0.0 if invalid else ivp
        sf[_F_IVR * _BLK + j] = 0.0 if invalid else ivr
        sf[_F_IERR * _BLK + j] = 0.0 if invalid | (var_e > thr) else math.sqrt(var_e)
        sf[_F_CP * _BLK + j] = inv_p if inv_p > 0.0 else 0.0
        sf[_F_CR * _BLK + j] = inv_r
        sf[_F_CN * _BLK + j] = wslope
        sf[_F_SLOPE * _BLK + j] = slope
        sf[_F_VR * _BLK + j] = var_r


@numba.njit(**_JIT)
def _block_accumulate(nb, sf) -> None:
    """Add an integration's terms (sf[_F_CP], [_F_CR], [_F_CN]) to the exposure sums."""
    for j in range(nb):
        sf[_F_AVP * _BLK + j] += sf[_F_CP * _BLK + j]
        sf[_F_AVR * _BLK + j] += sf[_F_CR * _BLK + j]
        sf[_F_ANUM * _BLK + j] += sf[_F_CN * _BLK + j]


@numba.njit(**_JIT)
def _block_combine(nb, sf, rdq) -> None:
    """Exposure rate and variances of a block's pixels from the sums over integrations
    (integrations weighted by inverse read-noise variance, JP-4318); rdq: the rate DQ that
    decides whether the pixel is unusable."""
    thr = _LARGE_VARIANCE_THRESHOLD
    # (branch-free, and split in two loops: that is what LLVM vectorizes)
    for j in range(nb):
        avp = sf[_F_AVP * _BLK + j]
        avr = sf[_F_AVR * _BLK + j]
        inv_vp = 1.0 / avp
        inv_vr = 1.0 / avr
        r_vp = inv_vp if avp > 0.0 else avp
        r_vp = 0.0 if (r_vp >= thr) | (r_vp < 0.0) else r_vp
        r_vr = inv_vr if avr > 0.0 else avr
        r_vr = 0.0 if r_vr >= thr else r_vr
        r_err = math.sqrt(r_vp + r_vr)
        invalid = (rdq[j] & np.uint32(_INVALID)) != 0
        sf[_F_RVP * _BLK + j] = 0.0 if invalid else r_vp
        sf[_F_RVR * _BLK + j] = r_vr
        sf[_F_RERR * _BLK + j] = 0.0 if invalid else r_err
    for j in range(nb):
        r_num = sf[_F_ANUM * _BLK + j]
        r_vr = sf[_F_RVR * _BLK + j]
        r_slope = r_num if math.isnan(r_num) else r_num * r_vr
        invalid = (rdq[j] & np.uint32(_INVALID)) != 0
        sf[_F_RSLOPE * _BLK + j] = np.nan if invalid else r_slope
        sf[_F_RVR * _BLK + j] = 0.0 if invalid else r_vr


@numba.njit(**_JIT)
def _store_block(sf, f_slope, pq, x0, nb, o_slope, o_dq, o_vp, o_vr, o_err) -> None:
    """Write a block's slope, DQ, variances and ERR (fields f_slope..f_slope+3 of ``sf``) to
    columns x0..x0+nb of the output rows (1-D, contiguous)."""
    x0 = max(x0, 0)  # (tells LLVM that indices are not negative: no wraparound selects)
    f = max(f_slope, 0) * _BLK
    # one loop per output: each stays within LLVM's budget of run-time alias checks
    for j in range(nb):
        o_slope[x0 + j] = sf[f + j]
    for j in range(nb):
        o_dq[x0 + j] = pq[j]
    for j in range(nb):
        o_vp[x0 + j] = sf[f + _BLK + j]
    for j in range(nb):
        o_vr[x0 + j] = sf[f + 2 * _BLK + j]
    for j in range(nb):
        o_err[x0 + j] = sf[f + 3 * _BLK + j]


@numba.njit(**_JIT)
def _fit_pixels(rowg, rowq, y, x0, cols, g0, ng, sf, pq, imed, ipois, ks, kv, use_vec,
                zeroframe, has_zf, group_time, frame_time, one_group_time, suppress, wtab,
                islope, ivp, ivr, ierr, cnt_dnu_sat, cnt_sat, dq0, idq, clean, has_closs, is0th,
                iszf, vec, d, q, oq, starts, ends, scratch, seg,
                o_rate, o_rdq, o_rvp, o_rvr, o_err, o_irate, o_idq, o_ivp, o_ivr, o_ierr, yo):
    """Fit the block's pixels ``x0 + cols`` one at a time, with every special case (flags,
    saturation, jumps, one-group ramps, ZEROFRAME, CHARGELOSS), and write their outputs in
    row ``yo``.

    rowg/rowq: the row's data and group DQ from ``_gather_row``; sf/pq: the block's per-pixel
    fields (gain, scaled read noise, dark current) and pixel DQ (with NO_GAIN_VALUE|DO_NOT_USE
    for a bad gain). With ``use_vec``, an integration without flags and with finite data
    reuses the block's vectorized results: its median imed[i*_BLK + j] (ipois: not finite),
    its segment's slope ks[i*_BLK + j] and read-noise variance kv[i*_BLK + j]; only its Poisson
    terms are redone with the pixel's median rate. islope .. vec: (nints,) per-integration
    scratch (passed in: views made here would cost reference counting on every call); d, q,
    oq (nints*ng,) a pixel's data and DQ.
    """
    nints = rowg.shape[0] // ng
    thr = _LARGE_VARIANCE_THRESHOLD
    seglen = np.float64(ng)
    for c in range(cols.shape[0]):
        j = cols[c]
        x = x0 + j
        pixeldq = pq[j]
        gn = sf[_F_GN * _BLK + j]
        rn = sf[_F_RN * _BLK + j]
        dc = sf[_F_DC * _BLK + j]

        # ---- per-integration group DQ, statistics and data; the median rate
        rate_dq = pixeldq
        any_closs = False
        acc = 0.0
        for i in range(nints):
            base = i * ng
            vec[i] = False
            if use_vec:
                orr = 0
                for k in range(ng):
                    orr |= rowq[base + k, x]
                vec[i] = orr == 0 and not ipois[i * _BLK + j]
            if vec[i]:
                acc += imed[i * _BLK + j]
                clean[i] = True
                cnt_dnu_sat[i] = 0
                cnt_sat[i] = 0
                has_closs[i] = False
                is0th[i] = False
                iszf[i] = False
                dq0[i] = pixeldq
                continue
            clean[i], cnt_dnu_sat[i], cnt_sat[i], bits, has_closs[i], is0th[i], iszf[i] = \
                _prep_int(rowg, rowq, zeroframe, has_zf, suppress, g0, ng, i, y, x, d, q, oq)
            dq0[i] = pixeldq | bits
            rate_dq |= bits
            any_closs = any_closs or has_closs[i]
            if ng == 1:  # the group value over its time (NaN is kept, as in stcal)
                acc += d[base] / one_group_time
            else:
                acc += _int_median_rate(d, q, base, ng, clean[i], is0th[i], iszf[i], group_time,
                                        frame_time, one_group_time, scratch)
        mrate = acc / nints

        # ---- per-integration fits
        r_vp = 0.0
        r_vr = 0.0
        r_num = 0.0
        dnu_cnt = 0
        sat_cnt = 0
        rate_sat = False
        for i in range(nints):
            base = i * ng
            dqm, idq[i] = _int_dq(clean[i], q[base], cnt_dnu_sat[i], cnt_sat[i], ng,
                                  np.uint32(dq0[i]))
            if vec[i]:  # one full-ramp segment: only its Poisson variance depends on mrate
                slope = ks[i * _BLK + j]
                var_r = kv[i * _BLK + j]
                var_p = _poisson_var(mrate, dc, group_time * gn * (seglen - 1.0))
                inv_p = 0.0 + 1.0 / var_p if var_p > 0.0 else 0.0
                islope[i], ivp[i], ivr[i], ierr[i], cp, cr, cn = _int_terms(
                    0.0 + 1.0 / var_r, inv_p, 0.0 + 1.0 / (var_p + var_r), 0.0 + slope / var_r,
                    dqm)
            else:
                t1 = _timing1(is0th[i], iszf[i], suppress, group_time, frame_time,
                              one_group_time)
                islope[i], ivp[i], ivr[i], ierr[i], cp, cr, cn = _fit_int(
                    d, q, base, ng, clean[i], cnt_dnu_sat[i], dqm, mrate, rn, gn, dc, t1,
                    group_time, wtab, starts, ends, seg)
            if cp > 0.0:
                r_vp += cp
            r_vr += cr
            r_num += cn
            dnu_cnt += (dqm & _DNU) != 0
            sat_cnt += (dqm & _SAT) != 0
            rate_sat = rate_sat or cnt_sat[i] > 0

        # ---- combine integrations (JP-4318: weights are the inverse read-noise variances)
        if dnu_cnt == nints:
            rate_dq |= np.uint32(_DNU)
        if sat_cnt == nints:
            rate_dq |= np.uint32(_SAT)
        if r_vp > 0.0:
            r_vp = 1.0 / r_vp
        if r_vp >= thr or r_vp < 0.0:
            r_vp = 0.0
        if r_vr > 0.0:
            r_vr = 1.0 / r_vr
        if r_vr >= thr:
            r_vr = 0.0
        r_err = math.sqrt(r_vp + r_vr)
        r_slope = r_num
        if rate_dq & _INVALID:
            r_slope = np.nan
            r_vp = 0.0
            r_vr = 0.0
            r_err = 0.0
        if rate_sat:
            rate_dq |= np.uint32(_SAT)
        if not math.isnan(r_slope):
            r_slope = r_slope * r_vr
        if any_closs:
            r_vr = _chargeloss_update(oq, nints, ng, has_closs, is0th, iszf, suppress, rn, gn,
                                      group_time, frame_time, one_group_time, starts, ends,
                                      ivr, r_vr)

        # ---- store
        o_rate[yo, x] = r_slope
        o_rdq[yo, x] = rate_dq
        o_rvp[yo, x] = r_vp
        o_rvr[yo, x] = r_vr
        o_err[yo, x] = r_err
        for i in range(nints):
            o_irate[i, yo, x] = islope[i]
            o_idq[i, yo, x] = idq[i]
            o_ivp[i, yo, x] = ivp[i]
            o_ivr[i, yo, x] = ivr[i]
            o_ierr[i, yo, x] = ierr[i]


@numba.njit(**_JIT)
def _fit_rows(data, gdq, pdq, readnoise, gain, dark, zeroframe, has_zf, g0, g1, extra_dnu,
              group_time, frame_time, one_group_time, rn_scale, suppress, wtab, pairs,
              o_rate, o_rdq, o_rvp, o_rvr, o_err, o_irate, o_idq, o_ivp, o_ivr, o_ierr,
              row_offset):
    """Fit every pixel of a row chunk, writing rows ``row_offset + y`` of the outputs.

    Per row: the ramps are copied to group-major scratch rows; then per block of _BLK pixels
    every pixel is fitted vectorized across the block as if no group were flagged, and the
    pixels with a flagged (or non-finite) integration are refitted one at a time by
    ``_fit_pixels`` (which reuses the vectorized fits of their unflagged integrations). Ramps
    too short or too long for the vectorized medians (ngroups < 3 or > _MAX_ROW_NETWORK + 1)
    only take the per-pixel path. Times in s (float32-rounded, as stcal reads them);
    rn_scale = sqrt(2 nframes). All scratch is per row or per block.
    """
    nints = data.shape[0]
    ny = data.shape[2]
    nx = data.shape[3]
    ng = g1 - g0
    rsz = nints * ng
    fast = pairs.shape[0] > 0 and ng >= 3

    extra8 = np.empty(ng, dtype=np.uint8)
    for k in range(ng):
        extra8[k] = np.uint8(_DNU) if extra_dnu[g0 + k] else np.uint8(0)
    wfast = np.empty(6 * ng, dtype=np.float64)
    for c in range(6):
        for k in range(ng):
            wfast[c * ng + k] = np.float64(wtab[c, ng, k])
    rowg = np.empty((rsz, nx), dtype=np.float32)
    rowq = np.empty((rsz, nx), dtype=np.uint8)
    qor = np.empty(nx, dtype=np.uint8)
    sf = np.empty(_NFIELDS * _BLK, dtype=np.float64)
    pq = np.empty(_BLK, dtype=np.uint32)
    rbuf = np.empty(max(ng, 1) * _BLK, dtype=np.float64)
    imed = np.empty(nints * _BLK, dtype=np.float64)
    ipois = np.empty(nints * _BLK, dtype=np.bool_)
    ks = np.empty(nints * _BLK, dtype=np.float64)
    kv = np.empty(nints * _BLK, dtype=np.float64)
    d = np.empty(rsz, dtype=np.float64)
    q = np.empty(rsz, dtype=np.uint32)
    oq = np.empty(rsz, dtype=np.uint32)
    starts = np.empty(ng + 1, dtype=np.int64)
    ends = np.empty(ng + 1, dtype=np.int64)
    scratch = np.empty(max(ng + 1, 16), dtype=np.float64)
    seg = np.empty(3, dtype=np.float64)
    islope = np.empty(nints, dtype=np.float64)
    ivp = np.empty(nints, dtype=np.float64)
    ivr = np.empty(nints, dtype=np.float64)
    ierr = np.empty(nints, dtype=np.float64)
    cnt_dnu_sat = np.empty(nints, dtype=np.int64)
    cnt_sat = np.empty(nints, dtype=np.int64)
    dq0 = np.empty(nints, dtype=np.int64)
    idq = np.empty(nints, dtype=np.uint32)
    clean = np.empty(nints, dtype=np.bool_)
    has_closs = np.empty(nints, dtype=np.bool_)
    is0th = np.empty(nints, dtype=np.bool_)
    iszf = np.empty(nints, dtype=np.bool_)
    vec = np.empty(nints, dtype=np.bool_)
    cols = np.empty(_BLK, dtype=np.int64)

    for y in range(ny):
        _gather_row(data, gdq, y, g0, ng, extra8, rowg, rowq, qor)
        yo = y + row_offset
        for x0 in range(0, nx, _BLK):
            nb = min(_BLK, nx - x0)
            _block_pixel_params(pdq, readnoise, gain, dark, y, x0, nb, rn_scale, sf, pq)
            ncols = 0  # pixels for _fit_pixels
            if fast:
                _block_clean_median_rates(rowg, nints, ng, x0, nb, group_time, pairs, rbuf, sf,
                                          imed, ipois)
                for j in range(nb):
                    cols[ncols] = j
                    ncols += (qor[x0 + j] != 0) | math.isnan(sf[_F_RATE * _BLK + j])
            else:
                for j in range(nb):
                    cols[j] = j
                ncols = nb
            if ncols < nb:  # the vectorized path
                for j in range(nb):
                    sf[_F_MRATE * _BLK + j] = sf[_F_RATE * _BLK + j] / nints
                    sf[_F_AVP * _BLK + j] = 0.0
                    sf[_F_AVR * _BLK + j] = 0.0
                    sf[_F_ANUM * _BLK + j] = 0.0
                for i in range(nints):
                    _block_fit_clean(rowg, i, ng, x0, nb, group_time, wfast, sf, pq)
                    if ncols:
                        io = i * _BLK
                        for j in range(nb):
                            ks[io + j] = sf[_F_SLOPE * _BLK + j]
                        for j in range(nb):
                            kv[io + j] = sf[_F_VR * _BLK + j]
                    _block_accumulate(nb, sf)
                    _store_block(sf, _F_ISLOPE, pq, x0, nb, o_irate[i, yo], o_idq[i, yo],
                                 o_ivp[i, yo], o_ivr[i, yo], o_ierr[i, yo])
                _block_combine(nb, sf, pq)
                _store_block(sf, _F_RSLOPE, pq, x0, nb, o_rate[yo], o_rdq[yo], o_rvp[yo],
                             o_rvr[yo], o_err[yo])
            if ncols:
                use_vec = fast and ncols < nb
                _fit_pixels(rowg, rowq, y, x0, cols[:ncols], g0, ng, sf, pq, imed, ipois, ks,
                            kv, use_vec, zeroframe, has_zf, group_time, frame_time,
                            one_group_time, suppress, wtab, islope, ivp, ivr, ierr,
                            cnt_dnu_sat, cnt_sat, dq0, idq, clean, has_closs, is0th, iszf, vec,
                            d, q, oq, starts, ends, scratch, seg, o_rate, o_rdq, o_rvp, o_rvr,
                            o_err, o_irate, o_idq, o_ivp, o_ivr, o_ierr, yo)


# --------------------------------------------------------------------------------------------
# Kernel signatures
# --------------------------------------------------------------------------------------------

def _array_type(dtype, ndim: int, readonly: bool = False) -> numba.types.Array:
    return numba.types.Array(numba.from_dtype(np.dtype(dtype)), ndim, "A", readonly=readonly)


def _out_type(dtype, ndim: int) -> numba.types.Array:
    return numba.types.Array(numba.from_dtype(np.dtype(dtype)), ndim, "C")


_T = numba.types
_F64 = _T.float64
_FIT_ROWS_SIGNATURE = (
    _array_type(np.float32, 4, True), _array_type(np.uint8, 4, True),      # data, gdq
    _array_type(np.uint32, 2, True), _array_type(np.float32, 2, True),     # pdq, readnoise
    _array_type(np.float32, 2, True), _array_type(np.float32, 2, True),    # gain, dark
    _array_type(np.float32, 3, True), _T.boolean,                         # zeroframe, has_zf
    _T.int64, _T.int64, _array_type(np.bool_, 1, True),                   # g0, g1, extra_dnu
    _F64, _F64, _F64, _F64, _T.boolean,             # group/frame/one-group time, rn_scale, suppress
    _array_type(np.float32, 3, True), _array_type(np.int64, 2, True),      # weights, median network
    _out_type(np.float32, 2), _out_type(np.uint32, 2),                     # rate, rate dq
    _out_type(np.float32, 2), _out_type(np.float32, 2), _out_type(np.float32, 2),
    _out_type(np.float32, 3), _out_type(np.uint32, 3),                     # ints rate, ints dq
    _out_type(np.float32, 3), _out_type(np.float32, 3), _out_type(np.float32, 3),
    _T.int64,                                                             # row_offset
)
_FLAG_ALL_SIGNATURE = (
    _array_type(np.uint8, 4, True), _array_type(np.bool_, 1, True), _T.boolean,
    _array_type(np.bool_, 1), _array_type(np.bool_, 1),
)


@functools.lru_cache(maxsize=None)
def _compiled(kernel_name: str):
    """The kernel compiled (or loaded from the cache) for its one signature; no other is made."""
    kernel, signature = {
        "fit_rows": (_fit_rows, _FIT_ROWS_SIGNATURE),
        "flag_all": (_group_flag_all_kernel, _FLAG_ALL_SIGNATURE),
    }[kernel_name]
    kernel.compile(signature)
    kernel.disable_compile()
    return kernel


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------

def _check_outputs(out: RampFitResult) -> None:
    """The kernel writes the outputs in place: they must be C-contiguous, writeable and of
    the documented dtypes (as ``RampFitResult.empty`` makes them)."""
    for f in fields(out):
        arr = getattr(out, f.name)
        want = np.uint32 if f.name.endswith("dq") else np.float32
        ndim = 3 if f.name.startswith("ints_") else 2
        if not isinstance(arr, np.ndarray) or arr.dtype != want or arr.ndim != ndim or \
                not arr.flags.c_contiguous or not arr.flags.writeable:
            raise ValueError(f"output {f.name} must be a writeable C-contiguous {np.dtype(want)} "
                             f"array of {ndim} dimensions")


def fit_ramps(
    data: np.ndarray,
    gdq: np.ndarray,
    pdq: np.ndarray,
    readnoise: np.ndarray,
    gain: np.ndarray,
    frame_time: float,
    group_time: float,
    nframes: int,
    groupgap: int,
    dropframes1: int,
    params: RampFitParameters,
    out: RampFitResult | None = None,
    row_offset: int = 0,
    *,
    dark_current: np.ndarray | float | None = None,
    zeroframe: np.ndarray | None = None,
    group_range: tuple[int, int] | None = None,
) -> RampFitResult:
    """Fit the ramps of a row chunk with OLS and optimal weighting (stcal's OLS_C).

    data: float32 (nints, ngroups, ny, nx) DN; gdq: uint8, same shape (not modified);
    pdq: uint32 (ny, nx); readnoise: (ny, nx) DN, the readnoise reference (subarray);
    gain: (ny, nx) e-/DN; frame_time, group_time: s. groupgap and dropframes1 only enter
    stcal's optional pedestal product and are accepted for interface symmetry.
    dark_current: the RampModel's ``average_dark_current`` (e-/s, 2-D or scalar; None = 0),
    added to the rate in Poisson variances as stcal does.
    zeroframe: float32 (nints, ny, nx) ZEROFRAME, used (where non-zero) for integrations
    with no good group, only when one-group suppression is off (stcal's rule; with the
    default suppress_one_group=True it is never used).
    group_range: the (first, end) groups from ``exposure_fit_plan`` (MIRI leading/trailing
    DO_NOT_USE groups dropped); None = all groups.

    Writes rows ``row_offset:row_offset+ny`` of ``out`` (allocated for this chunk, with
    ``row_offset`` ignored, when None) and returns it. Exposure-level rules that need the whole
    frame (stcal returning no products, MIRI group trimming) are ``group_flag_all`` +
    ``exposure_fit_plan``, run by the caller before fitting.
    """
    del groupgap, dropframes1  # only used by the optional pedestal output
    data = np.asarray(data, dtype=np.float32)
    gdq = np.asarray(gdq, dtype=np.uint8)
    pdq = np.asarray(pdq, dtype=np.uint32)
    readnoise = np.asarray(readnoise, dtype=np.float32)
    gain = np.asarray(gain, dtype=np.float32)
    if data.ndim != 4 or gdq.shape != data.shape:
        raise ValueError(f"data {data.shape} and gdq {gdq.shape} must both be (nints, ngroups, ny, nx)")
    nints, ngroups_full, ny, nx = data.shape
    for name, arr in (("pdq", pdq), ("readnoise", readnoise), ("gain", gain)):
        if arr.shape != (ny, nx):
            raise ValueError(f"{name} has shape {arr.shape}, expected {(ny, nx)}")
    if out is None:
        out = RampFitResult.empty(nints, ny, nx)
        row_offset = 0
    elif out.ints_rate.shape[0] != nints or out.rate.shape[1] != nx or \
            row_offset < 0 or row_offset + ny > out.rate.shape[0]:
        raise ValueError("chunk does not fit the output arrays at this row offset")
    else:
        _check_outputs(out)

    g0, g1 = (0, ngroups_full) if group_range is None else (int(group_range[0]), int(group_range[1]))
    if not 0 <= g0 < g1 <= ngroups_full:
        raise ValueError(f"bad group_range {group_range} for {ngroups_full} groups")

    if dark_current is None:
        dark = np.broadcast_to(np.float32(0.0), (ny, nx))
    elif np.ndim(dark_current) == 0:
        dark = np.broadcast_to(np.float32(dark_current), (ny, nx))
    else:
        dark = np.asarray(dark_current, dtype=np.float32)
        if dark.shape != (ny, nx):
            raise ValueError(f"dark_current has shape {dark.shape}, expected {(ny, nx)}")
    if zeroframe is None:
        zf = np.zeros((1, 1, 1), dtype=np.float32)
    else:
        zf = np.asarray(zeroframe, dtype=np.float32)
        if zf.shape != (nints, ny, nx):
            raise ValueError(f"zeroframe has shape {zf.shape}, expected {(nints, ny, nx)}")

    # stcal turns suppression off for one-group ramps; the C code reads the times as float32
    suppress = bool(params.suppress_one_group) and ngroups_full > 1
    gt = float(np.float32(group_time))
    ft = float(np.float32(frame_time))
    one_group_time = (float(nframes) + 1.0) * ft / 2.0
    rn_scale = float(np.sqrt(2.0 * nframes))
    extra_dnu = first_last_group_mask(ngroups_full, params.firstgroup, params.lastgroup)

    _compiled("fit_rows")(
        data, gdq, pdq, readnoise, gain, dark, zf, zeroframe is not None, g0, g1, extra_dnu,
        gt, ft, one_group_time, rn_scale, suppress, _weight_table(g1 - g0),
        _median_network(g1 - g0 - 1),
        out.rate, out.rate_dq, out.rate_var_poisson, out.rate_var_rnoise, out.rate_err,
        out.ints_rate, out.ints_dq, out.ints_var_poisson, out.ints_var_rnoise, out.ints_err,
        int(row_offset),
    )
    return out
