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
order, float32 ``powf`` weights); medians of clean ramps are computed row-wide with a sorting
network, other pixels take a per-pixel path.
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
    def empty(cls, nints: int, ny: int, nx: int) -> "RampFitResult":
        """Zero-filled output arrays for a (ny, nx) frame with ``nints`` integrations."""
        f2 = lambda: np.zeros((ny, nx), dtype=np.float32)  # noqa: E731
        f3 = lambda: np.zeros((nints, ny, nx), dtype=np.float32)  # noqa: E731
        return cls(
            rate=f2(), rate_dq=np.zeros((ny, nx), dtype=np.uint32),
            rate_var_poisson=f2(), rate_var_rnoise=f2(), rate_err=f2(),
            ints_rate=f3(), ints_dq=np.zeros((nints, ny, nx), dtype=np.uint32),
            ints_var_poisson=f3(), ints_var_rnoise=f3(), ints_err=f3(),
        )


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
# arrays all share the same machine code (and the same on-disk cache entry).

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
def _weight_table(ngroups: int) -> np.ndarray:
    tab = _weight_table_kernel(max(ngroups, 1))
    tab.setflags(write=False)
    return tab


@numba.njit(inline="always", **_JIT)
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


@numba.njit(**_JIT)
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
def _sort16(v, n):  # noqa: PLR0915
    """Sort ``v[:n]`` (n <= 16, no NaN) in place: Batcher odd-even merge network of
    63 compare-exchanges on registers, padded with +inf (writes ``v[:16]``)."""
    a0 = v[0] if n > 0 else np.inf
    a1 = v[1] if n > 1 else np.inf
    a2 = v[2] if n > 2 else np.inf
    a3 = v[3] if n > 3 else np.inf
    a4 = v[4] if n > 4 else np.inf
    a5 = v[5] if n > 5 else np.inf
    a6 = v[6] if n > 6 else np.inf
    a7 = v[7] if n > 7 else np.inf
    a8 = v[8] if n > 8 else np.inf
    a9 = v[9] if n > 9 else np.inf
    a10 = v[10] if n > 10 else np.inf
    a11 = v[11] if n > 11 else np.inf
    a12 = v[12] if n > 12 else np.inf
    a13 = v[13] if n > 13 else np.inf
    a14 = v[14] if n > 14 else np.inf
    a15 = v[15] if n > 15 else np.inf
    a0, a1 = min(a0, a1), max(a0, a1)
    a2, a3 = min(a2, a3), max(a2, a3)
    a4, a5 = min(a4, a5), max(a4, a5)
    a6, a7 = min(a6, a7), max(a6, a7)
    a8, a9 = min(a8, a9), max(a8, a9)
    a10, a11 = min(a10, a11), max(a10, a11)
    a12, a13 = min(a12, a13), max(a12, a13)
    a14, a15 = min(a14, a15), max(a14, a15)
    a0, a2 = min(a0, a2), max(a0, a2)
    a1, a3 = min(a1, a3), max(a1, a3)
    a4, a6 = min(a4, a6), max(a4, a6)
    a5, a7 = min(a5, a7), max(a5, a7)
    a8, a10 = min(a8, a10), max(a8, a10)
    a9, a11 = min(a9, a11), max(a9, a11)
    a12, a14 = min(a12, a14), max(a12, a14)
    a13, a15 = min(a13, a15), max(a13, a15)
    a1, a2 = min(a1, a2), max(a1, a2)
    a5, a6 = min(a5, a6), max(a5, a6)
    a9, a10 = min(a9, a10), max(a9, a10)
    a13, a14 = min(a13, a14), max(a13, a14)
    a0, a4 = min(a0, a4), max(a0, a4)
    a1, a5 = min(a1, a5), max(a1, a5)
    a2, a6 = min(a2, a6), max(a2, a6)
    a3, a7 = min(a3, a7), max(a3, a7)
    a8, a12 = min(a8, a12), max(a8, a12)
    a9, a13 = min(a9, a13), max(a9, a13)
    a10, a14 = min(a10, a14), max(a10, a14)
    a11, a15 = min(a11, a15), max(a11, a15)
    a2, a4 = min(a2, a4), max(a2, a4)
    a3, a5 = min(a3, a5), max(a3, a5)
    a10, a12 = min(a10, a12), max(a10, a12)
    a11, a13 = min(a11, a13), max(a11, a13)
    a1, a2 = min(a1, a2), max(a1, a2)
    a3, a4 = min(a3, a4), max(a3, a4)
    a5, a6 = min(a5, a6), max(a5, a6)
    a9, a10 = min(a9, a10), max(a9, a10)
    a11, a12 = min(a11, a12), max(a11, a12)
    a13, a14 = min(a13, a14), max(a13, a14)
    a0, a8 = min(a0, a8), max(a0, a8)
    a1, a9 = min(a1, a9), max(a1, a9)
    a2, a10 = min(a2, a10), max(a2, a10)
    a3, a11 = min(a3, a11), max(a3, a11)
    a4, a12 = min(a4, a12), max(a4, a12)
    a5, a13 = min(a5, a13), max(a5, a13)
    a6, a14 = min(a6, a14), max(a6, a14)
    a7, a15 = min(a7, a15), max(a7, a15)
    a4, a8 = min(a4, a8), max(a4, a8)
    a5, a9 = min(a5, a9), max(a5, a9)
    a6, a10 = min(a6, a10), max(a6, a10)
    a7, a11 = min(a7, a11), max(a7, a11)
    a2, a4 = min(a2, a4), max(a2, a4)
    a3, a5 = min(a3, a5), max(a3, a5)
    a6, a8 = min(a6, a8), max(a6, a8)
    a7, a9 = min(a7, a9), max(a7, a9)
    a10, a12 = min(a10, a12), max(a10, a12)
    a11, a13 = min(a11, a13), max(a11, a13)
    a1, a2 = min(a1, a2), max(a1, a2)
    a3, a4 = min(a3, a4), max(a3, a4)
    a5, a6 = min(a5, a6), max(a5, a6)
    a7, a8 = min(a7, a8), max(a7, a8)
    a9, a10 = min(a9, a10), max(a9, a10)
    a11, a12 = min(a11, a12), max(a11, a12)
    a13, a14 = min(a13, a14), max(a13, a14)
    v[0] = a0
    v[1] = a1
    v[2] = a2
    v[3] = a3
    v[4] = a4
    v[5] = a5
    v[6] = a6
    v[7] = a7
    v[8] = a8
    v[9] = a9
    v[10] = a10
    v[11] = a11
    v[12] = a12
    v[13] = a13
    v[14] = a14
    v[15] = a15

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
    """Median of ``vals[:n]`` (no NaN; len(vals) >= 16); NaN for n == 0. Reorders ``vals``."""
    if n == 0:
        return np.nan
    if n == 1:
        return vals[0]
    if n == 2:
        return (vals[0] + vals[1]) / 2.0
    if n <= 8:
        _sort8(vals, n)
    elif n <= 16:
        _sort16(vals, n)
    else:
        _shell_sort(vals, n)
    m = n >> 1
    if n & 1:
        return vals[m]
    return (vals[m] + vals[m - 1]) / 2.0


@numba.njit(inline="always", **_JIT)
def _median_rate(d, q, nints, ngroups, clean, is0th, iszf, group_time, frame_time,
                 one_group_time, scratch) -> float:
    """The pixel's rate estimate for Poisson variances (DN/s): the mean over integrations of
    the median first difference of the usable groups (stcal's rule, incl. its special cases).

    d: float64 (nints*ngroups,) data (NaN where saturated); q: the group DQ; clean[i]: no
    group of integration i is flagged.
    """
    if ngroups == 1:
        acc = 0.0
        for i in range(nints):
            acc += d[i * ngroups] / one_group_time
        return acc / nints
    acc = 0.0
    for i in range(nints):
        base = i * ngroups
        if is0th[i]:
            mrate = d[base] / one_group_time
        elif iszf[i]:
            mrate = d[base] / frame_time
        else:
            n = 0
            if clean[i]:
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
                    if not (q[base + k] & _JUMP):
                        diff = cur - prev
                        if not math.isnan(diff):
                            scratch[n] = diff
                            n += 1
                    prev = cur
            if n == 0 and not math.isnan(loc0):
                scratch[0] = loc0
                n = 1
            mrate = _median(scratch, n)
        if math.isnan(mrate):
            mrate = 0.0
        acc += mrate
    return acc / nints


@numba.njit(inline="always", **_JIT)
def _poisson_var(median_rate, dark, pden) -> float:
    if median_rate > 0.0:
        return (median_rate + dark) / pden
    return dark / pden


@numba.njit(inline="always", **_JIT)
def _rnoise_var_short(rn, timing, gain) -> float:
    """Read-noise variance of a one- or two-group segment ((DN/s)^2)."""
    rnum = rn / timing
    rnum = 12.0 * rnum * rnum
    rden = 6.0 * gain * gain
    return rnum / rden


@numba.njit(inline="always", **_JIT)
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
        if is0th[i] and not suppress:
            timing1 = one_group_time
        elif iszf[i] and not suppress:
            timing1 = frame_time
        else:
            timing1 = group_time
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
def _row_clean_median_rates(rowg, nints, ng, group_time, pairs, r, rates) -> None:
    """Median-rate sums of every pixel of a row, computed as if no group were flagged.

    Vectorized across the row (the common case: most ramps carry no flag). rowg: float32
    (nints*ng, nx) group-major row data; pairs: the sorting network for ng-1 values;
    r: float64 scratch (ng, nx). Writes rates[x] = sum over integrations of the median
    first difference (DN/s); NaN when a difference is NaN (the pixel needs the general path).
    """
    nx = rowg.shape[1]
    n = ng - 1
    m = n >> 1
    for x in range(nx):
        rates[x] = 0.0
    for i in range(nints):
        for k in range(ng):
            for x in range(nx):
                r[k, x] = np.float64(rowg[i * ng + k, x]) / group_time
        for k in range(n):
            for x in range(nx):
                diff = r[k + 1, x] - r[k, x]
                r[k, x] = diff
                rates[x] += diff * 0.0  # NaN (or inf) poisons the sum, else adds a zero
        for c in range(pairs.shape[0]):
            a_row = pairs[c, 0]
            b_row = pairs[c, 1]
            for x in range(nx):
                a = r[a_row, x]
                b = r[b_row, x]
                swap = b < a
                r[a_row, x] = b if swap else a
                r[b_row, x] = a if swap else b
        if n & 1:
            for x in range(nx):
                rates[x] += r[m, x]
        else:
            for x in range(nx):
                rates[x] += (r[m, x] + r[m - 1, x]) / 2.0


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


@numba.njit(**_JIT)
def _fit_rows(data, gdq, pdq, readnoise, gain, dark, zeroframe, has_zf, g0, g1, extra_dnu,
              group_time, frame_time, one_group_time, rn_scale, suppress, wtab, pairs,
              o_rate, o_rdq, o_rvp, o_rvr, o_err, o_irate, o_idq, o_ivp, o_ivr, o_ierr,
              row_offset):
    """Fit every pixel of a row chunk, writing rows ``row_offset + y`` of the outputs.

    Per row: the ramps are gathered into pixel-major scratch rows, the median rates of clean
    ramps are computed row-wide; then per pixel: group-DQ statistics and the special cases,
    the segment fits of each integration, their combination, and the CHARGELOSS pass.
    Times in s (float32-rounded, as stcal reads them); rn_scale = sqrt(2 nframes).
    """
    nints = data.shape[0]
    ny = data.shape[2]
    nx = data.shape[3]
    ng = g1 - g0
    rsz = nints * ng
    thr = _LARGE_VARIANCE_THRESHOLD

    rowd = np.empty((nx, rsz), dtype=np.float32)
    rowg = np.empty((rsz, nx), dtype=np.float32)
    batch = pairs.shape[0] > 0 or ng == 2
    rbuf = np.empty((ng, nx), dtype=np.float64)
    row_rates = np.empty(nx, dtype=np.float64)
    rowq = np.empty((nx, rsz), dtype=np.uint8)
    d = np.empty(rsz, dtype=np.float64)
    q = np.empty(rsz, dtype=np.uint32)
    oq = np.empty(rsz, dtype=np.uint32)
    starts = np.empty(ng + 1, dtype=np.int64)
    ends = np.empty(ng + 1, dtype=np.int64)
    scratch = np.empty(max(ng + 1, 16), dtype=np.float64)
    seg = np.empty(3, dtype=np.float64)
    cnt_good = np.empty(nints, dtype=np.int64)
    cnt_dnu = np.empty(nints, dtype=np.int64)
    cnt_dnu_sat = np.empty(nints, dtype=np.int64)
    cnt_sat = np.empty(nints, dtype=np.int64)
    has_closs = np.empty(nints, dtype=np.bool_)
    is0th = np.empty(nints, dtype=np.bool_)
    iszf = np.empty(nints, dtype=np.bool_)
    clean = np.empty(nints, dtype=np.bool_)
    islope = np.empty(nints, dtype=np.float64)
    ivp = np.empty(nints, dtype=np.float64)
    ivr = np.empty(nints, dtype=np.float64)
    ierr = np.empty(nints, dtype=np.float64)
    idq = np.empty(nints, dtype=np.uint32)

    for y in range(ny):
        # gather this row's ramps pixel-major (reads are contiguous along x)
        for i in range(nints):
            for g in range(ng):
                col = i * ng + g
                extra = np.uint8(_DNU) if extra_dnu[g0 + g] else np.uint8(0)
                for x in range(nx):
                    v = data[i, g0 + g, y, x]
                    rowg[col, x] = v
                    rowd[x, col] = v
                    rowq[x, col] = gdq[i, g0 + g, y, x] | extra
        if batch:
            _row_clean_median_rates(rowg, nints, ng, group_time, pairs, rbuf, row_rates)
        yo = y + row_offset
        for x in range(nx):
            pixeldq = np.uint32(pdq[y, x])
            gn = np.float64(gain[y, x])
            if gn <= 0.0 or math.isnan(gn):
                pixeldq |= np.uint32(_DNU | _NGV)
            # stcal scales the readnoise in float32: rn * gain / sqrt(2 nframes)
            rn = np.float64(np.float32(np.float64(readnoise[y, x]) * (gn / rn_scale)))
            dc = np.float64(dark[y, x])
            rate_dq = pixeldq
            any_closs = False

            # ---- per-integration group DQ, statistics and data
            for i in range(nints):
                base = i * ng
                orr = 0
                ngood = 0
                for k in range(ng):
                    v8 = rowq[x, base + k]
                    orr |= v8
                    ngood += (v8 & _NOT_PERS) == 0
                supp = suppress and ngood == 1
                cg = 0
                cd = 0
                cds = 0
                cs = 0
                jump = False
                pers = False
                closs = False
                clean[i] = orr == 0 and not supp
                if clean[i]:
                    # fast path: every group good (q and oq are not read for clean ramps)
                    for k in range(ng):
                        d[base + k] = np.float64(rowd[x, base + k])
                    cg = ng
                else:
                    for k in range(ng):
                        v = np.uint32(rowq[x, base + k])
                        oq[base + k] = v
                        if supp:
                            v |= np.uint32(_DNU)
                        if k == 0 and g0 > 0:
                            v &= np.uint32(~_JUMP & 0xFF)
                        q[base + k] = v
                        if v & _JUMP:
                            jump = True
                        if v & _PERS:
                            pers = True
                        if v & _CLOSS:
                            closs = True
                        if v == 0:
                            cg += 1
                        elif v & _DNU:
                            cd += 1
                        if v & _INVALID:
                            cds += 1
                        if v & _SAT:
                            d[base + k] = np.nan
                            cs += 1
                        else:
                            d[base + k] = np.float64(rowd[x, base + k])
                is0th[i] = False
                iszf[i] = False
                if not suppress:
                    if cg == 1 and (clean[i] or q[base] == 0):
                        is0th[i] = True
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
                            iszf[i] = True
                            clean[i] = False
                cnt_good[i] = cg
                cnt_dnu[i] = cd
                cnt_dnu_sat[i] = cds
                cnt_sat[i] = cs
                has_closs[i] = closs
                any_closs = any_closs or closs
                flags = pixeldq
                if jump:
                    flags |= np.uint32(_JUMP)
                    rate_dq |= np.uint32(_JUMP)
                if pers:
                    flags |= np.uint32(_PERS)
                    rate_dq |= np.uint32(_PERS)
                idq[i] = flags

            all_clean = batch
            for i in range(nints):
                all_clean = all_clean and clean[i]
            if all_clean and not math.isnan(row_rates[x]):
                mrate = row_rates[x] / nints
            else:
                mrate = _median_rate(d, q, nints, ng, clean, is0th, iszf, group_time, frame_time,
                                     one_group_time, scratch)

            # ---- per-integration fits (segments combined by inverse read-noise variance)
            r_vp = 0.0
            r_vr = 0.0
            r_num = 0.0
            dnu_cnt = 0
            sat_cnt = 0
            rate_sat = False
            for i in range(nints):
                base = i * ng
                islope[i] = 0.0
                ivp[i] = 0.0
                ivr[i] = 0.0
                ierr[i] = 0.0
                if is0th[i] and not suppress:
                    timing1 = one_group_time
                elif iszf[i] and not suppress:
                    timing1 = frame_time
                else:
                    timing1 = group_time
                whole_sat = not clean[i] and (q[base] & _SAT) != 0
                if whole_sat:
                    idq[i] |= np.uint32(_DNU | _SAT)
                    islope[i] = np.nan
                    nseg = 0
                elif clean[i]:
                    starts[0] = 0
                    ends[0] = ng
                    nseg = 1
                else:
                    nseg = _find_segments(q, base, ng, starts, ends)
                if cnt_dnu_sat[i] == ng:
                    idq[i] |= np.uint32(_DNU)
                    if cnt_sat[i] == ng:
                        idq[i] |= np.uint32(_SAT)
                elif nseg > 0:
                    inv_r = 0.0
                    inv_p = 0.0
                    inv_e = 0.0
                    num = 0.0
                    for s in range(nseg):
                        _fit_segment(d, base, starts[s], ends[s] - starts[s], rn, gn, dc, mrate,
                                     timing1, group_time, wtab, seg)
                        inv_r += 1.0 / seg[2]
                        if seg[1] > 0.0:
                            inv_p += 1.0 / seg[1]
                        inv_e += 1.0 / (seg[1] + seg[2])
                        num += seg[0] / seg[2]
                    if inv_p > 0.0:
                        ivp[i] = 1.0 / inv_p
                    if ivp[i] >= thr:
                        ivp[i] = 0.0
                    ivr[i] = 1.0 / inv_r
                    if ivr[i] >= thr:
                        ivr[i] = 0.0
                    if idq[i] & _INVALID:
                        islope[i] = np.nan
                        ivp[i] = 0.0
                        ivr[i] = 0.0
                        ierr[i] = 0.0
                    else:
                        var_e = 1.0 / inv_e
                        islope[i] = num * ivr[i]
                        ierr[i] = 0.0 if var_e > thr else math.sqrt(var_e)
                    if inv_p > 0.0:
                        r_vp += inv_p
                    r_vr += inv_r
                    r_num += num
                if idq[i] & _DNU:
                    dnu_cnt += 1
                    islope[i] = np.nan
                if idq[i] & _SAT:
                    sat_cnt += 1
                    islope[i] = np.nan
                if cnt_sat[i] > 0:
                    idq[i] |= np.uint32(_SAT)
                    rate_sat = True

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


# --------------------------------------------------------------------------------------------
# Kernel signatures
# --------------------------------------------------------------------------------------------

def _array_type(dtype, ndim: int, readonly: bool = False) -> numba.types.Array:
    return numba.types.Array(numba.from_dtype(np.dtype(dtype)), ndim, "A", readonly=readonly)


_T = numba.types
_F64 = _T.float64
_FIT_ROWS_SIGNATURE = (
    _array_type(np.float32, 4, True), _array_type(np.uint8, 4, True),      # data, gdq
    _array_type(np.uint32, 2, True), _array_type(np.float32, 2, True),     # pdq, readnoise
    _array_type(np.float32, 2, True), _array_type(np.float32, 2, True),    # gain, dark
    _array_type(np.float32, 3, True), _T.boolean,                         # zeroframe, has_zf
    _T.int64, _T.int64, _array_type(np.bool_, 1, True),                   # g0, g1, extra_dnu
    _F64, _F64, _F64, _F64, _T.boolean,             # group/frame/one-group time, rn_scale, suppress
    _array_type(np.float32, 3, True), _array_type(np.int64, 2, True),      # weights, network
    _array_type(np.float32, 2), _array_type(np.uint32, 2),                 # rate, rate dq
    _array_type(np.float32, 2), _array_type(np.float32, 2), _array_type(np.float32, 2),
    _array_type(np.float32, 3), _array_type(np.uint32, 3),                 # ints rate, ints dq
    _array_type(np.float32, 3), _array_type(np.float32, 3), _array_type(np.float32, 3),
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
        _sorting_network(g1 - g0 - 1),
        out.rate, out.rate_dq, out.rate_var_poisson, out.rate_var_rnoise, out.rate_err,
        out.ints_rate, out.ints_dq, out.ints_var_poisson, out.ints_var_rnoise, out.ints_err,
        int(row_offset),
    )
    return out
