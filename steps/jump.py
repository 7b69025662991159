"""Jump (cosmic-ray) detection by two-point differences, as jwst 3.0.0 / stcal 1.20 do it.

Reproduces ``JumpStep`` with ``maximum_cores='1'`` for near-IR data (no snowballs, no showers):

* ramps are converted to electrons (``data * gain``; read noise ``readnoise * gain``), groups
  flagged DO_NOT_USE or SATURATED become NaN, first differences are taken per integration;
* a per-pixel method is chosen for the whole exposure from the group counts:
  - ``sigma_clip``: astropy-style sigma clipping of the differences across integrations
    (``only_use_ints``) or across all differences, when there are at least
    ``minimum_sigclip_groups`` integrations (resp. usable groups);
  - ``single_pass``: when every integration has at least ``min_diffs_single_pass`` usable
    differences, all differences further than ``rejection_threshold`` sigma from the median
    difference are flagged at once;
  - ``iterative`` (the usual case): the largest outlier of the absolute differences is flagged
    and removed, the clipped median and noise recomputed, until nothing exceeds the threshold
    (thresholds for 4+/3/2 usable differences: rejection / four-group / three-group);
* the four neighbours of jumps between ``min_jump_to_flag_neighbors`` and
  ``max_jump_to_flag_neighbors`` sigma are flagged; groups after large jumps are flagged
  (``after_jump_flag_*``); JUMP_DET is then removed from DO_NOT_USE / SATURATED groups.

Noise model (electrons, per difference): ``sigma**2 = |median| + (readnoise*gain)**2 / nframes``
(the read-noise reference is a CDS noise; a difference of two nframes-averaged groups has
variance ``rn_cds**2 / nframes``).

Frame-level decisions (the method, the skip of the whole step, the after-jump thresholds in
electrons) depend on the whole frame; when called on row chunks, pass ``frame_dnu_groups``
(:func:`dnu_group_mask` AND-ed over all chunks) and ``gain_median`` (``np.nanmedian`` of the
full gain array) to get the whole-frame answer. Neighbour flagging reaches one row: a chunk
needs one halo row above and below (holding *input* flags) for exact inner rows.

Besides GROUPDQ, stcal writes PIXELDQ: NO_GAIN_VALUE | DO_NOT_USE where gain <= 0 or NaN.
PRIMECRS: :func:`primary_cosmic_ray_rate` of the summed ``JumpStats.primary_crs``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import numba
import numpy as np

from . import dqflags
from .errors import ParameterError, StepNotImplementedError

__all__ = [
    "JumpParameters",
    "JumpStats",
    "IGNORED_JWST_KEYS",
    "detect_jumps",
    "dnu_group_mask",
    "choose_method",
    "after_jump_groups",
    "flag_bad_gain",
    "primary_cosmic_ray_rate",
]

_DNU = np.uint8(dqflags.DO_NOT_USE)
_SAT = np.uint8(dqflags.SATURATED)
_JUMP = np.uint8(dqflags.JUMP_DET)

# method codes used by the kernels
_ITERATIVE, _SINGLE_PASS, _SIGMA_CLIP = 0, 1, 2
_METHOD_CODES = {"iterative": _ITERATIVE, "single_pass": _SINGLE_PASS, "sigma_clip": _SIGMA_CLIP}

#: stcal's single-process path forces this value of ``minimum_groups``
_STCAL_MINIMUM_GROUPS = 3
#: safety factor of the exact-result-preserving early exits (covers float32 rounding)
_SAFE = 0.9999
#: Shell sort gaps (Ciura), largest first
_SHELL_GAPS = (701, 301, 132, 57, 23, 10, 4, 1)
#: astropy.stats.sigma_clip default number of iterations
_SIGCLIP_MAXITERS = 5

#: jwst JumpStep / stpipe keys accepted by :meth:`JumpParameters.from_mapping` and ignored:
#: multiprocessing, the (disabled) snowball and shower options, and generic stpipe step keys.
IGNORED_JWST_KEYS: frozenset[str] = frozenset({
    "maximum_cores",
    # snowballs (expand_large_events) and MIRI showers (find_showers)
    "min_sat_area", "min_jump_area", "expand_factor", "use_ellipses", "sat_required_snowball",
    "min_sat_radius_extend", "sat_expand", "edge_size", "mask_snowball_core_next_int",
    "snowball_time_masked_next_int", "max_shower_amplitude", "extend_snr_threshold",
    "extend_min_area", "extend_inner_radius", "extend_outer_radius",
    "extend_ellipse_expand_ratio", "time_masked_after_shower", "max_extended_radius",
    # generic stpipe Step keys and parameter-file bookkeeping
    "pre_hooks", "post_hooks", "output_file", "output_dir", "output_ext", "output_use_model",
    "output_use_index", "save_results", "skip", "suffix", "search_output_file", "input_dir",
    "class", "name",
})


# --------------------------------------------------------------------------------------------
# Parameters and statistics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JumpParameters:
    """JumpStep parameters (jwst names and defaults) used by the two-point detection.

    ``minimum_groups`` is accepted but, as in stcal's single-process path (jwst's default
    ``maximum_cores='1'``), the value 3 is used. ``expand_large_events`` and ``find_showers``
    are not implemented: switching either on raises :class:`NotImplementedError`.
    """

    rejection_threshold: float = 4.0
    three_group_rejection_threshold: float = 6.0
    four_group_rejection_threshold: float = 5.0
    flag_4_neighbors: bool = True
    max_jump_to_flag_neighbors: float = 1000.0
    min_jump_to_flag_neighbors: float = 10.0
    after_jump_flag_dn1: float = 0.0
    after_jump_flag_time1: float = 0.0
    after_jump_flag_dn2: float = 0.0
    after_jump_flag_time2: float = 0.0
    expand_large_events: bool = False
    find_showers: bool = False
    min_diffs_single_pass: int = 10
    minimum_groups: int = 3
    minimum_sigclip_groups: int = 100
    only_use_ints: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool":
                if not isinstance(value, (bool, np.bool_)):
                    raise ParameterError(f"jump: {f.name} must be a boolean, got {value!r}")
            elif f.type == "int":
                if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                    raise ParameterError(f"jump: {f.name} must be an integer, got {value!r}")
            elif (isinstance(value, (bool, np.bool_))
                  or not isinstance(value, (int, float, np.number))):
                raise ParameterError(f"jump: {f.name} must be a number, got {value!r}")
        for name in ("rejection_threshold", "three_group_rejection_threshold",
                     "four_group_rejection_threshold"):
            if not getattr(self, name) >= 0:
                raise ParameterError(f"jump: {name} must be >= 0, got {getattr(self, name)!r}")
        if self.expand_large_events:
            raise StepNotImplementedError(
                "jump: expand_large_events=True (snowball flagging) is not implemented by "
                "calstream; run with expand_large_events=False (the jwst default)")
        if self.find_showers:
            raise StepNotImplementedError(
                "jump: find_showers=True (MIRI shower flagging) is not implemented by "
                "calstream; run with find_showers=False (the jwst default)")

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any]) -> "JumpParameters":
        """Build from a jwst-style parameter mapping (``pars-jumpstep`` / step arguments).

        Values may be strings as in jwst config files (``"True"``, ``"4.0"``). Keys in
        :data:`IGNORED_JWST_KEYS` are dropped; any other unknown key raises ParameterError.
        """
        known = {f.name: f.type for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in params.items():
            if key in known:
                kwargs[key] = _coerce(key, known[key], value)
            elif key not in IGNORED_JWST_KEYS:
                raise ParameterError(f"jump: unknown parameter {key!r}")
        return cls(**kwargs)


def _coerce(name: str, kind: str, value: Any) -> Any:
    """Convert one parameter value to its field's type (bool, int or float)."""
    try:
        if kind == "bool":
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("true", "t", "yes", "1"):
                    return True
                if low in ("false", "f", "no", "0"):
                    return False
                raise ValueError(value)
            if isinstance(value, (bool, np.bool_)):
                return bool(value)
            raise ValueError(value)
        if isinstance(value, (bool, np.bool_)):
            raise ValueError(value)
        if kind == "int":
            number = float(value) if isinstance(value, str) else value
            if int(number) != number:
                raise ValueError(value)
            return int(number)
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ParameterError(f"jump: bad value {value!r} for {name} ({kind})") from exc


@dataclass
class JumpStats:
    """What :func:`detect_jumps` did, per inner row of the chunk (halo rows excluded).

    ``primary_crs_per_row`` counts, per row, the (integration, group) samples carrying JUMP_DET
    after the primary detection (before neighbour / after-jump flagging): stcal's
    ``number_crs``. ``new_jumps_per_row`` counts samples that gained JUMP_DET in the call.
    ``skipped`` is True when stcal would skip the detection (too few usable groups; it then
    reports -99 cosmic rays); ``method`` is the detection method or "not_run" (NGROUPS <= 2,
    jwst skips the step).
    """

    method: str
    skipped: bool
    primary_crs_per_row: np.ndarray
    new_jumps_per_row: np.ndarray
    bad_gain_per_row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def rows(self, sel: slice) -> "JumpStats":
        """The statistics restricted to rows ``sel`` (e.g. the chunk without its halo)."""
        return JumpStats(self.method, self.skipped, self.primary_crs_per_row[sel].copy(),
                         self.new_jumps_per_row[sel].copy(), self.bad_gain_per_row[sel].copy())

    @property
    def primary_crs(self) -> int:
        """stcal's number of primary cosmic rays (-99 when detection was skipped)."""
        return -99 if self.skipped else int(self.primary_crs_per_row.sum())

    @property
    def new_jumps(self) -> int:
        """Number of group samples newly flagged JUMP_DET."""
        return int(self.new_jumps_per_row.sum())

    @staticmethod
    def combine(parts: list["JumpStats"]) -> "JumpStats":
        """Concatenate per-chunk statistics (rows in order)."""
        if not parts:
            raise ValueError("nothing to combine")
        return JumpStats(parts[0].method, any(p.skipped for p in parts),
                         np.concatenate([p.primary_crs_per_row for p in parts]),
                         np.concatenate([p.new_jumps_per_row for p in parts]),
                         np.concatenate([p.bad_gain_per_row for p in parts]))


# --------------------------------------------------------------------------------------------
# Frame-level helpers
# --------------------------------------------------------------------------------------------


def dnu_group_mask(gdq: np.ndarray) -> np.ndarray:
    """bool (nints, ngroups): groups whose every pixel of ``gdq`` is DO_NOT_USE.

    For a whole frame processed in chunks, AND the chunks' masks together.
    """
    return _dnu_group_mask(gdq)


@numba.njit(cache=True, nogil=True)
def _dnu_group_mask(gdq):
    nints, ngroups, ny, nx = gdq.shape
    out = np.ones((nints, ngroups), dtype=np.bool_)
    for i in range(nints):
        for g in range(ngroups):
            done = False
            for y in range(ny):
                for x in range(nx):
                    if (gdq[i, g, y, x] & _DNU) == 0:
                        out[i, g] = False
                        done = True
                        break
                if done:
                    break
    return out


def choose_method(nints: int, ngroups: int, frame_dnu_groups: np.ndarray,
                  params: JumpParameters) -> str:
    """stcal's choice for the exposure: "sigma_clip", "single_pass", "iterative" or "skipped".

    ``frame_dnu_groups`` is :func:`dnu_group_mask` of the whole frame.
    """
    flagged = np.asarray(frame_dnu_groups, dtype=bool).reshape(nints, ngroups)
    per_int = flagged.sum(axis=1)
    max_flagged = int(per_int.max()) if nints else 0
    total_groups = nints * ngroups - int(per_int.sum())
    min_usable_groups = ngroups - max_flagged
    min_usable_diffs = min_usable_groups - 1
    if params.only_use_ints:
        use_sigclip = nints >= params.minimum_sigclip_groups
    else:
        use_sigclip = total_groups >= params.minimum_sigclip_groups
    if min_usable_groups < _STCAL_MINIMUM_GROUPS and not use_sigclip:
        return "skipped"
    if use_sigclip:
        return "sigma_clip"
    if min_usable_diffs >= params.min_diffs_single_pass:
        return "single_pass"
    return "iterative"


def after_jump_groups(time_s: float, group_time: float) -> int:
    """Groups flagged after a large jump for a time window, s (jwst: ``int(t // tgroup)``)."""
    return int(time_s // group_time)


def flag_bad_gain(pdq: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """Set NO_GAIN_VALUE | DO_NOT_USE in ``pdq`` (in place) where gain <= 0 or NaN, as stcal does.

    Returns the bool mask of bad-gain pixels, shape (ny, nx).
    """
    with np.errstate(invalid="ignore"):
        bad = ~(gain > 0)
    pdq[bad] |= np.uint32(dqflags.NO_GAIN_VALUE | dqflags.DO_NOT_USE)
    return bad


def primary_cosmic_ray_rate(n_primary_crs: int, nints: int, ngroups: int, n_dnu_groups: int,
                            group_time: float, nrows: int, ncols: int) -> float | None:
    """PRIMECRS as jwst computes it: ``1000 * ncrs / (group_time * usable_groups * npixels)``.

    ``usable_groups = nints*ngroups - n_dnu_groups - nints`` where ``n_dnu_groups`` counts the
    (integration, group) planes entirely DO_NOT_USE. ``nrows, ncols`` is the full frame size.
    ``n_primary_crs`` is -99 when detection was skipped (jwst then stores a negative rate).
    Returns None when there is no usable group (jwst leaves the keyword unset).
    """
    total_groups = nints * ngroups - n_dnu_groups - nints
    if total_groups < 1:
        return None
    total_time = group_time * total_groups
    total_pixels = nrows * ncols
    return float(1000 * np.int64(n_primary_crs) / (total_time * total_pixels))


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def detect_jumps(data: np.ndarray, gdq: np.ndarray, pdq: np.ndarray, readnoise: np.ndarray,
                 gain: np.ndarray, frame_time: float, group_time: float, nframes: int,
                 params: JumpParameters, *, frame_dnu_groups: np.ndarray | None = None,
                 gain_median: float | None = None, halo: tuple[int, int] = (0, 0)) -> JumpStats:
    """Flag jumps in a ramp chunk; ``gdq`` (and ``pdq``) are modified in place.

    data: float32 (nints, ngroups, ny, nx), DN. gdq: uint8, same shape: JUMP_DET set on
    jump groups (never on DO_NOT_USE / SATURATED ones). pdq: uint32 (ny, nx): stcal sets
    NO_GAIN_VALUE | DO_NOT_USE where gain <= 0 or NaN; nothing else reads or writes it.
    readnoise: float32 (ny, nx), DN (readnoise reference, CDS). gain: float32 (ny, nx), e-/DN.
    frame_time (unused by stcal), group_time: s (after-jump windows). nframes: frames per group.
    frame_dnu_groups / gain_median: whole-frame values (see module doc); default: this chunk's.

    Rows depend on each other only through neighbour flagging, so with one halo row on each
    side of a chunk its inner rows get the whole-frame flags. Every row of gdq, halo rows
    included, must hold the step's *input* flags (give each chunk its own copy; rows already
    processed by a previous chunk are not valid input); keep only the inner rows afterwards.
    ``halo=(top, bottom)`` only restricts the returned statistics to the inner rows.
    """
    data = _kernel_array(data, np.float32)
    gain = _kernel_array(gain, np.float32)
    readnoise = _kernel_array(readnoise, np.float32)
    if data.ndim != 4:
        raise ValueError(f"data must be 4-D (nints, ngroups, ny, nx), got shape {data.shape}")
    if gdq.shape != data.shape or gdq.dtype != np.uint8:
        raise ValueError(f"gdq must be uint8 of shape {data.shape}, got {gdq.dtype} {gdq.shape}")
    nints, ngroups, ny, nx = data.shape
    if gain.shape != (ny, nx) or readnoise.shape != (ny, nx) or pdq.shape != (ny, nx):
        raise ValueError("gain, readnoise and pdq must have shape (ny, nx) = "
                         f"{(ny, nx)}: {gain.shape}, {readnoise.shape}, {pdq.shape}")
    if int(nframes) < 1:
        raise ValueError(f"nframes must be >= 1, got {nframes}")
    top, bottom = (int(h) for h in halo)
    if top < 0 or bottom < 0 or top + bottom > ny:
        raise ValueError(f"bad halo {halo} for {ny} rows")
    inner = slice(top, ny - bottom)
    if ngroups <= 2:  # jwst skips the step before calling stcal
        zeros = np.zeros(ny - top - bottom, np.int64)
        return JumpStats("not_run", True, zeros, zeros.copy(), zeros.copy())

    # the kernels are compiled for C-contiguous writable arrays: work on copies otherwise
    gdq_k = _kernel_array(gdq, np.uint8)
    pdq_k = _kernel_array(pdq, np.uint32)
    stats = _detect_chunk(data, gdq_k, pdq_k, readnoise, gain, group_time, int(nframes), params,
                          frame_dnu_groups, gain_median)
    if gdq_k is not gdq:
        gdq[...] = gdq_k
    if pdq_k is not pdq:
        pdq[...] = pdq_k
    return stats.rows(inner)


def _kernel_array(a: np.ndarray, dtype: type) -> np.ndarray:
    """``a`` itself if C-contiguous, writable and of ``dtype``, else such a copy.

    Keeps the numba kernels to one compiled signature (a row slice of a 4-D array is not
    C-contiguous; a read-only array has its own type).
    """
    a = np.asarray(a)
    if a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable:
        return a
    return np.array(a, dtype=dtype, order="C", copy=True)


def _detect_chunk(data: np.ndarray, gdq: np.ndarray, pdq: np.ndarray, readnoise: np.ndarray,
                  gain: np.ndarray, group_time: float, nframes: int, params: JumpParameters,
                  frame_dnu_groups: np.ndarray | None, gain_median: float | None) -> JumpStats:
    """:func:`detect_jumps` on validated float32 inputs, statistics for every row."""
    nints, ngroups, ny, nx = data.shape
    bad_gain = flag_bad_gain(pdq, gain)
    if frame_dnu_groups is None:
        frame_dnu_groups = dnu_group_mask(gdq)
    method = choose_method(nints, ngroups, frame_dnu_groups, params)
    if gain_median is None:
        gain_median = float(np.nanmedian(gain)) if gain.size else math.nan
    # stcal: dn * np.nanmedian(gain) with a float32 median -> float32 product
    e1 = float(np.float32(params.after_jump_flag_dn1) * np.float32(gain_median))
    e2 = float(np.float32(params.after_jump_flag_dn2) * np.float32(gain_median))
    n1 = after_jump_groups(params.after_jump_flag_time1, group_time)
    n2 = after_jump_groups(params.after_jump_flag_time2, group_time)

    jumps_before = np.zeros(ny, np.int64)
    jumps_after = np.zeros(ny, np.int64)
    crs = np.zeros(ny, np.int64)
    if method != "skipped":
        plane_all = _detect_pass(
            data, gdq, gain, readnoise, float(nframes), _METHOD_CODES[method],
            float(params.rejection_threshold), float(params.four_group_rejection_threshold),
            float(params.three_group_rejection_threshold), bool(params.only_use_ints),
            jumps_before)
        if method == "sigma_clip" and plane_all.any():
            # stcal: a group where every pixel is JUMP or DO_NOT_USE loses its jump-only flags
            _reset_jump_only_planes(gdq, plane_all)
        _post_pass(data, gdq, gain, readnoise, float(nframes), bool(params.flag_4_neighbors),
                   float(params.min_jump_to_flag_neighbors),
                   float(params.max_jump_to_flag_neighbors),
                   n1 > 0 or n2 > 0, e1, n1, e2, n2, crs, jumps_after)
    else:
        _clear_redundant_jumps(gdq, jumps_before, jumps_after)
    return JumpStats(method, method == "skipped", crs, jumps_after - jumps_before,
                     bad_gain.sum(axis=1).astype(np.int64))


# --------------------------------------------------------------------------------------------
# Numba kernels: per-pixel statistics
# --------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _sort_inplace(w, m):
    """Sort w[:m] ascending (no NaN): Shell sort, Ciura's gaps (insertion sort for m <= 4)."""
    for gap in _SHELL_GAPS:
        if gap >= m:
            continue
        for i in range(gap, m):
            v = w[i]
            j = i
            while j >= gap and w[j - gap] > v:
                w[j] = w[j - gap]
                j -= gap
            w[j] = v


@numba.njit(cache=True, nogil=True)
def _median_inplace(w, m):
    """Median of w[:m] (no NaN) as numpy computes it ((lo + hi) / 2 for even m); NaN if m == 0.

    Sorts w[:m] in place.
    """
    if m == 0:
        return np.nan
    _sort_inplace(w, m)
    h = m // 2
    if m % 2 == 1:
        return w[h]
    return (w[h - 1] + w[h]) / 2.0


@numba.njit(cache=True, nogil=True)
def _nanmedian(v, n, work):
    """np.nanmedian of v[:n] (float64), using work as scratch."""
    m = np.int64(0)
    for k in range(n):
        if not np.isnan(v[k]):
            work[m] = v[k]
            m += 1
    return _median_inplace(work, m)


@numba.njit(cache=True, nogil=True)
def _diff_sigma(median, var_rn):
    """Noise of one difference (electrons): sqrt(|median| + rn^2/nframes); NaN if zero."""
    s = math.sqrt(abs(median) * 1.0 + var_rn)
    if s == 0.0:
        return np.nan
    return s


@numba.njit(cache=True, nogil=True)
def _clipped_abs_median(absd, n, work):
    """stcal's clipped median of the usable absolute differences absd[:n] (NaN = unusable).

    4+ usable: drop every value equal to the maximum, median of the rest; 3: median;
    2: minimum; fewer: NaN. Returns (median, number_usable).
    """
    m = np.int64(0)
    vmax = -np.inf
    for k in range(n):
        v = absd[k]
        if not np.isnan(v):
            work[m] = v
            m += 1
            if v > vmax:
                vmax = v
    if m < 2:
        return np.nan, m
    if m == 2:
        return min(work[0], work[1]), m
    keep = m
    if m >= 4:
        keep = np.int64(0)
        for k in range(m):
            if work[k] != vmax:
                work[keep] = work[k]
                keep += 1
    return _median_inplace(work, keep), m


@numba.njit(cache=True, nogil=True)
def _iterative_pixel(fd, n, var_rn, thr4, thr3, thr2, absd, work, hits):
    """Iteratively flag the largest outlier among the differences fd[:n] (float64, NaN=bad).

    hits[:n] is set to 1 for flagged differences. Thresholds apply to 4+/3/2 usable diffs.
    """
    vmin = np.inf
    vmax = -np.inf
    m = np.int64(0)
    for k in range(n):
        v = abs(fd[k])
        absd[k] = v
        hits[k] = 0
        if not np.isnan(v):
            m += 1
            vmin = min(vmin, v)
            vmax = max(vmax, v)
    if m < 2:
        return
    # Cheap exit for clean ramps: the median lies in [vmin, vmax], so no |d| - median exceeds
    # vmax - vmin and sigma >= sqrt(vmin + rn^2). The margin covers float32 rounding.
    thr = thr4 if m >= 4 else (thr3 if m == 3 else thr2)
    if (vmax - vmin) < _SAFE * thr * math.sqrt(vmin + var_rn):
        return
    for it in range(n):
        med, m = _clipped_abs_median(absd, n, work)
        if m < 2:
            return
        if it > 0:  # stcal keeps the re-computed medians in a float32 array
            med = np.float64(np.float32(med))
        sigma = _diff_sigma(med, var_rn)
        # ratios share sigma, so the largest ratio is at the largest |float32(|d| - median)|
        emax = -1.0
        for k in range(n):
            if not np.isnan(absd[k]):
                e = abs(np.float64(np.float32(absd[k] - med)))
                if e > emax:
                    emax = e
        if emax < 0.0:
            return
        ratio = emax / sigma
        thr = thr4 if m >= 4 else (thr3 if m == 3 else thr2)
        if not ratio > thr:
            return
        for k in range(n):
            if not np.isnan(absd[k]):
                if abs(np.float64(np.float32(absd[k] - med))) == emax:
                    hits[k] = 1
                    absd[k] = np.nan


@numba.njit(cache=True, nogil=True)
def _single_pass_pixel(fd, n, var_rn, thr, work, hits):
    """Flag every finite difference further than thr sigma from the median difference."""
    vmin = np.inf
    vmax = -np.inf
    for k in range(n):
        hits[k] = 0
        v = fd[k]
        if not np.isnan(v):
            vmin = min(vmin, v)
            vmax = max(vmax, v)
    # Cheap exit (see _iterative_pixel): |d - median| <= vmax - vmin and |median| is at least
    # the smallest |value| of [vmin, vmax].
    low = 0.0 if (vmin <= 0.0 <= vmax) else min(abs(vmin), abs(vmax))
    if (vmax - vmin) < _SAFE * thr * math.sqrt(low + var_rn):
        return
    med = _nanmedian(fd, n, work)
    sigma = _diff_sigma(med, var_rn)
    for k in range(n):
        if np.isfinite(fd[k]) and abs(fd[k] - med) / sigma > thr:
            hits[k] = 1


@numba.njit(cache=True, nogil=True)
def _kth_smallest(a, n, k):
    """Wirth's selection of the k-th smallest of a[:n]; permutes a (as astropy's C code)."""
    lo = 0
    hi = n - 1
    while lo < hi:
        x = a[k]
        i = lo
        j = hi
        while True:
            while a[i] < x:
                i += 1
            while x < a[j]:
                j -= 1
            if i <= j:
                t = a[i]
                a[i] = a[j]
                a[j] = t
                i += 1
                j -= 1
            if i > j:
                break
        if j < k:
            lo = i
        if k < i:
            hi = j
    return a[k]


@numba.njit(cache=True, nogil=True)
def _sigclip_bounds(buf, count, nsigma, maxiters):
    """astropy sigma_clip bounds (median centre, std, nsigma both sides) of buf[:count]."""
    if count == 0:
        return np.nan, np.nan
    lo = np.nan
    hi = np.nan
    it = 0
    while True:
        if count % 2 == 0:
            med = 0.5 * (_kth_smallest(buf, count, count // 2)
                         + _kth_smallest(buf, count, count // 2 - 1))
        else:
            med = _kth_smallest(buf, count, (count - 1) // 2)
        mean = 0.0
        for k in range(count):
            mean += buf[k]
        mean /= count
        var = 0.0
        for k in range(count):
            d = mean - buf[k]
            var += d * d
        std = math.sqrt(var / count)
        lo = med - nsigma * std
        hi = med + nsigma * std
        kept = 0
        for k in range(count):
            if buf[k] >= lo and buf[k] <= hi:
                buf[kept] = buf[k]
                kept += 1
        if kept == count:
            break
        count = kept
        it += 1
        if it >= maxiters:
            break
    return lo, hi


@numba.njit(cache=True, nogil=True)
def _sigclip_pixel(fd, nints, ndiffs, only_use_ints, nsigma, buf, hits):
    """Flag differences clipped by sigma clipping across integrations (or all differences)."""
    n = nints * ndiffs
    for k in range(n):
        hits[k] = 0
    if only_use_ints:
        for d in range(ndiffs):
            count = np.int64(0)
            for i in range(nints):
                v = fd[i * ndiffs + d]
                if np.isfinite(v):
                    buf[count] = v
                    count += 1
            lo, hi = _sigclip_bounds(buf, count, nsigma, _SIGCLIP_MAXITERS)
            for i in range(nints):
                v = fd[i * ndiffs + d]
                if np.isfinite(v) and (v < lo or v > hi):
                    hits[i * ndiffs + d] = 1
    else:
        count = np.int64(0)
        for k in range(n):
            if np.isfinite(fd[k]):
                buf[count] = fd[k]
                count += 1
        lo, hi = _sigclip_bounds(buf, count, nsigma, _SIGCLIP_MAXITERS)
        for k in range(n):
            if np.isfinite(fd[k]) and (fd[k] < lo or fd[k] > hi):
                hits[k] = 1


# --------------------------------------------------------------------------------------------
# Numba kernels: loading ramps
# --------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _load_row(data, gdq, gain, y, ebuf):
    """ebuf[i*ngroups+g, x] = float32 electrons of row y; NaN for DO_NOT_USE / SATURATED.

    Returns the number of JUMP_DET samples of the row.
    """
    nints, ngroups, ny, nx = data.shape
    bad = _DNU | _SAT
    nan = np.float32(np.nan)
    jumps = 0
    for i in range(nints):
        for g in range(ngroups):
            row = ebuf[i * ngroups + g]
            dq = gdq[i, g, y]
            for x in range(nx):
                q = dq[x]
                jumps += q & _JUMP
                v = data[i, g, y, x] * gain[y, x]
                row[x] = nan if (q & bad) else v
    return jumps // _JUMP


@numba.njit(cache=True, nogil=True)
def _row_readnoise_var(readnoise, gain, y, nframes, out):
    """out[x] = read-noise variance of one difference, electrons^2: float32 (rn*g)^2 / nframes."""
    for x in range(readnoise.shape[1]):
        rn = readnoise[y, x] * gain[y, x]
        out[x] = np.float64(rn * rn) / nframes


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _update_extremes(lo, hi, s1, s2, l1, l2, l3, cnt):
    """Fold the differences hi - lo (float32, NaN skipped) into running extremes per column.

    s1 <= s2: two smallest; l1 >= l2 >= l3: three largest; cnt: number of usable values.
    (np.minimum / np.maximum on NaN-free operands: lets LLVM vectorize the loop.)
    """
    inf = np.float32(np.inf)
    for x in range(lo.size):
        v = hi[x] - lo[x]
        ok = v == v
        cnt[x] += np.int32(1) if ok else np.int32(0)
        vs = v if ok else inf
        vl = v if ok else -inf
        a = s1[x]
        s2[x] = np.minimum(s2[x], np.maximum(a, vs))
        s1[x] = np.minimum(a, vs)
        c1 = l1[x]
        c2 = l2[x]
        l3[x] = np.maximum(l3[x], np.minimum(c2, vl))
        l2[x] = np.maximum(c2, np.minimum(c1, vl))
        l1[x] = np.maximum(c1, vl)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _update_extremes_abs(lo, hi, s1, s2, l1, l2, l3, cnt):
    """As :func:`_update_extremes` for the absolute differences |hi - lo|."""
    inf = np.float32(np.inf)
    for x in range(lo.size):
        v = abs(hi[x] - lo[x])
        ok = v == v
        cnt[x] += np.int32(1) if ok else np.int32(0)
        vs = v if ok else inf
        vl = v if ok else -inf
        a = s1[x]
        s2[x] = np.minimum(s2[x], np.maximum(a, vs))
        s1[x] = np.minimum(a, vs)
        c1 = l1[x]
        c2 = l2[x]
        l3[x] = np.maximum(l3[x], np.minimum(c2, vl))
        l2[x] = np.maximum(c2, np.minimum(c1, vl))
        l1[x] = np.maximum(c1, vl)


@numba.njit(cache=True, nogil=True)
def _row_candidates(ebuf, nints, ngroups, var_rn, method, thr4, thr3, thr2, ext, cnt, cand):
    """Mark in cand[x] the pixels of a loaded row that may hold a jump (exact-safe prescreen).

    From the two smallest (s1 <= s2) and three largest (l1 >= l2 >= l3) usable differences
    (absolute ones for the iterative method) the median is bounded -- for 4+ values with a
    single maximum the clipped median lies in [s2, l3], otherwise in [s1, l1] -- which bounds
    the largest deviation from it and the noise from below. Pixels whose bound stays below
    the threshold cannot be flagged. Sigma clipping has no prescreen. ext: float32 (5, nx)
    scratch. Returns the candidate count.
    """
    nx = ebuf.shape[1]
    if method == _SIGMA_CLIP:
        for x in range(nx):
            cand[x] = True
        return nx
    s1, s2, l1, l2, l3 = ext[0], ext[1], ext[2], ext[3], ext[4]
    inf = np.float32(np.inf)
    for x in range(nx):
        s1[x] = inf
        s2[x] = inf
        l1[x] = -inf
        l2[x] = -inf
        l3[x] = -inf
        cnt[x] = 0
    use_abs = method == _ITERATIVE
    for i in range(nints):
        for d in range(ngroups - 1):
            lo = ebuf[i * ngroups + d]
            hi = ebuf[i * ngroups + d + 1]
            if use_abs:
                _update_extremes_abs(lo, hi, s1, s2, l1, l2, l3, cnt)
            else:
                _update_extremes(lo, hi, s1, s2, l1, l2, l3, cnt)
    ncand = 0
    for x in range(nx):
        m = cnt[x]
        a1 = np.float64(s1[x])
        top = np.float64(l1[x])
        if m >= 4 and l2[x] < l1[x]:
            if use_abs:  # clipped median of m-1 >= 3 values: in [s2, l3]
                mlo = np.float64(s2[x])
                mhi = np.float64(l3[x])
            else:  # median of m >= 4 values: in [s2, l2]
                mlo = np.float64(s2[x])
                mhi = np.float64(l2[x])
        elif m == 3:
            mlo = np.float64(s2[x])
            mhi = mlo
        else:
            mlo = a1
            mhi = top
        dev = max(top - mlo, mhi - a1)
        if use_abs:
            low = mlo
            thr = thr4 if m >= 4 else (thr3 if m == 3 else thr2)
        else:
            low = 0.0 if (mlo <= 0.0 <= mhi) else min(abs(mlo), abs(mhi))
            thr = thr4
        clean = m < 2 or dev < _SAFE * thr * math.sqrt(low + var_rn[x])
        cand[x] = not clean
        ncand += not clean
    return ncand


@numba.njit(cache=True, nogil=True)
def _first_diffs(e, nints, ngroups, fd):
    """fd[i*(ngroups-1)+d] = float32 difference of groups d+1 and d (as float64)."""
    nd = ngroups - 1
    for i in range(nints):
        base = i * ngroups
        for d in range(nd):
            fd[i * nd + d] = np.float64(np.float32(e[base + d + 1] - e[base + d]))


@numba.njit(cache=True, nogil=True)
def _pixel_first_diffs(data, gdq, gain, y, x, e, fd):
    """First differences (electrons) of one pixel, read straight from the 4-D arrays."""
    nints, ngroups = data.shape[0], data.shape[1]
    bad = _DNU | _SAT
    for i in range(nints):
        for g in range(ngroups):
            if gdq[i, g, y, x] & bad:
                e[i * ngroups + g] = np.float32(np.nan)
            else:
                e[i * ngroups + g] = data[i, g, y, x] * gain[y, x]
    _first_diffs(e, nints, ngroups, fd)


@numba.njit(cache=True, nogil=True)
def _readnoise_var(readnoise, gain, y, x, nframes):
    """Read-noise variance of one difference, electrons^2: float32 (rn*gain)^2 / nframes."""
    rn = np.float32(readnoise[y, x] * gain[y, x])
    rn2 = np.float32(rn * rn)
    return np.float64(rn2) / nframes


# --------------------------------------------------------------------------------------------
# Numba kernels: passes over the chunk
# --------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _detect_pass(data, gdq, gain, readnoise, nframes, method, thr4, thr3, thr2, only_use_ints,
                 jumps_before):
    """Primary detection over all rows: sets JUMP_DET in gdq.

    jumps_before[y] receives the number of JUMP_DET samples of row y on input. Returns bool
    (nints, ngroups): planes where every pixel is JUMP_DET or DO_NOT_USE afterwards (only
    meaningful for sigma clipping).
    """
    nints, ngroups, ny, nx = data.shape
    nig = nints * ngroups
    nd = ngroups - 1
    n = nints * nd
    ebuf = np.empty((nig, nx), dtype=np.float32)
    var_rn = np.empty(nx, dtype=np.float64)
    ext = np.empty((5, nx), dtype=np.float32)
    cnt = np.empty(nx, dtype=np.int32)
    cand = np.empty(nx, dtype=np.bool_)
    e = np.empty(nig, dtype=np.float32)
    fd = np.empty(n, dtype=np.float64)
    absd = np.empty(n, dtype=np.float64)
    work = np.empty(n, dtype=np.float64)
    hits = np.zeros(n, dtype=np.uint8)
    plane_all = np.ones((nints, ngroups), dtype=np.bool_)
    for y in range(ny):
        jumps_before[y] = _load_row(data, gdq, gain, y, ebuf)
        _row_readnoise_var(readnoise, gain, y, nframes, var_rn)
        ncand = _row_candidates(ebuf, nints, ngroups, var_rn, method, thr4, thr3, thr2,
                                ext, cnt, cand)
        if ncand > 0:
            for x in range(nx):
                if not cand[x]:
                    continue
                for c in range(nig):
                    e[c] = ebuf[c, x]
                _first_diffs(e, nints, ngroups, fd)
                if method == _ITERATIVE:
                    _iterative_pixel(fd, n, var_rn[x], thr4, thr3, thr2, absd, work, hits)
                elif method == _SINGLE_PASS:
                    _single_pass_pixel(fd, n, var_rn[x], thr4, work, hits)
                else:
                    _sigclip_pixel(fd, nints, nd, only_use_ints, thr4, work, hits)
                for k in range(n):
                    if hits[k]:
                        i = k // nd
                        gdq[i, k - i * nd + 1, y, x] |= _JUMP
        if method == _SIGMA_CLIP:
            for i in range(nints):
                for g in range(ngroups):
                    if plane_all[i, g]:
                        for x in range(nx):
                            if (gdq[i, g, y, x] & (_JUMP | _DNU)) == 0:
                                plane_all[i, g] = False
                                break
    return plane_all


@numba.njit(cache=True, nogil=True)
def _reset_jump_only_planes(gdq, planes):
    """In the marked (integration, group) planes, zero the samples whose DQ is exactly JUMP_DET."""
    nints, ngroups, ny, nx = gdq.shape
    for i in range(nints):
        for g in range(ngroups):
            if planes[i, g]:
                for y in range(ny):
                    for x in range(nx):
                        if gdq[i, g, y, x] == _JUMP:
                            gdq[i, g, y, x] = 0


@numba.njit(cache=True, nogil=True)
def _zero_rows(a):
    """a[:, :] = 0 for a 2-D uint8 array (explicit loop: cheaper to compile)."""
    for r in range(a.shape[0]):
        for c in range(a.shape[1]):
            a[r, c] = 0


@numba.njit(cache=True, nogil=True)
def _row_jump_scan(gdq, y, any_jump):
    """JUMP_DET samples in row y (all groups); sets any_jump[x] != 0 if one is in a group >= 1."""
    nints, ngroups, ny, nx = gdq.shape
    count = 0
    for x in range(nx):
        any_jump[x] = 0
    for i in range(nints):
        row = gdq[i, 0, y]
        for x in range(nx):
            count += row[x] & _JUMP
        for g in range(1, ngroups):
            row = gdq[i, g, y]
            for x in range(nx):
                j = row[x] & _JUMP
                count += j
                any_jump[x] |= j
    return count // _JUMP


@numba.njit(cache=True, nogil=True)
def _neighbour_sources(data, gdq, gain, readnoise, nframes, y, want_src, nb_min, nb_max,
                       any_jump, e, fd, work, src):
    """src[i*ngroups+g, x] = 1 where row y has a jump whose significance is in (nb_min, nb_max).

    src has nx + 1 columns: src[c, nx] = 1 when the plane row c has any source.
    Significance = |diff - median diff| / sigma with stcal's unclipped median of the signed
    differences. Returns the number of JUMP_DET samples of row y (all groups).
    """
    nints, ngroups, ny, nx = data.shape
    nd = ngroups - 1
    n = nints * nd
    count = _row_jump_scan(gdq, y, any_jump)
    _zero_rows(src)
    if not want_src or count == 0:
        return count
    for x in range(nx):
        if not any_jump[x]:
            continue
        _pixel_first_diffs(data, gdq, gain, y, x, e, fd)
        med = _nanmedian(fd, n, work)
        sigma = _diff_sigma(med, _readnoise_var(readnoise, gain, y, x, nframes))
        for i in range(nints):
            for g in range(1, ngroups):
                if gdq[i, g, y, x] & _JUMP:
                    ratio = abs(fd[i * nd + g - 1] - med) / sigma
                    if ratio < nb_max and ratio > nb_min:
                        src[i * ngroups + g, x] = 1
                        src[i * ngroups + g, nx] = 1
    return count


@numba.njit(cache=True, nogil=True)
def _flag_neighbours(gdq, y, below, here, above):
    """Set JUMP_DET in row y next to the sources of rows y-1, y, y+1 (not on SAT/DNU groups).

    below / here / above: uint8 (nints*ngroups, nx+1) source masks of the three rows (zeros
    outside the chunk); the last column is 1 when the plane row has any source.
    """
    nints, ngroups, ny, nx = gdq.shape
    keep = _SAT | _DNU
    for i in range(nints):
        for g in range(1, ngroups):
            c = i * ngroups + g
            if not (here[c, nx] | below[c, nx] | above[c, nx]):
                continue
            row = gdq[i, g, y]
            h = here[c]
            b = below[c]
            a = above[c]
            for x in range(nx):
                f = h[x] | b[x] | a[x]
                if x > 0:
                    f |= h[x - 1]
                if x < nx - 1:
                    f |= h[x + 1]
                if f and (row[x] & keep) == 0:
                    row[x] |= _JUMP


@numba.njit(cache=True, nogil=True)
def _flag_after_jumps(data, gdq, gain, y, e1, n1, e2, n2, any_jump, e, fd, work,
                      start1, start2):
    """Flag n1 (n2) groups after jumps of at least e1 (e2) electrons above the median diff."""
    nints, ngroups, ny, nx = data.shape
    nd = ngroups - 1
    n = nints * nd
    if _row_jump_scan(gdq, y, any_jump) == 0:
        return
    for x in range(nx):
        if not any_jump[x]:
            continue
        _pixel_first_diffs(data, gdq, gain, y, x, e, fd)
        med = _nanmedian(fd, n, work)
        for i in range(nints):
            for g in range(ngroups):
                start1[g] = False
                start2[g] = False
            for g in range(1, ngroups):
                if gdq[i, g, y, x] & _JUMP:
                    ejump = (fd[i * nd + g - 1] - med) * 1.0
                    start1[g] = ejump >= e1
                    start2[g] = ejump >= e2
            last = -1
            for g in range(ngroups):
                if start1[g]:
                    last = max(last, g + n1)
                if start2[g]:
                    last = max(last, g + n2)
                if g <= last and (gdq[i, g, y, x] & (_SAT | _DNU)) == 0:
                    gdq[i, g, y, x] |= _JUMP


@numba.njit(cache=True, nogil=True)
def _clear_redundant_row(gdq, y):
    """Remove JUMP_DET from groups also flagged DO_NOT_USE or SATURATED (row y).

    Returns the number of JUMP_DET samples left in the row.
    """
    nints, ngroups, ny, nx = gdq.shape
    bad = _DNU | _SAT
    cleared = np.uint8(0xFF ^ _JUMP)
    jumps = 0
    for i in range(nints):
        for g in range(ngroups):
            row = gdq[i, g, y]
            for x in range(nx):
                v = row[x]
                v = v & cleared if (v & bad) != 0 else v
                row[x] = v
                jumps += v & _JUMP
    return jumps // _JUMP


@numba.njit(cache=True, nogil=True)
def _clear_redundant_jumps(gdq, jumps_before, jumps_after):
    """Remove JUMP_DET from groups also flagged DO_NOT_USE or SATURATED (all rows).

    jumps_before / jumps_after[y]: JUMP_DET samples of row y before / after.
    """
    nints, ngroups, ny, nx = gdq.shape
    for y in range(ny):
        c = 0
        for i in range(nints):
            for g in range(ngroups):
                for x in range(nx):
                    c += gdq[i, g, y, x] & _JUMP
        jumps_before[y] = c // _JUMP
        jumps_after[y] = _clear_redundant_row(gdq, y)


@numba.njit(cache=True, nogil=True)
def _post_pass(data, gdq, gain, readnoise, nframes, flag_neighbours, nb_min, nb_max,
               after_jump, e1, n1, e2, n2, crs, jumps_after):
    """Count primary jumps, flag neighbours and after-jump groups, clear redundant flags.

    Sources of row y+1 are taken before row y+1 receives any neighbour flag, so flags do
    not cascade; row y is final after step y. crs[y] receives row y's primary jump count,
    jumps_after[y] its final number of JUMP_DET samples.
    """
    nints, ngroups, ny, nx = data.shape
    nig = nints * ngroups
    n = nints * (ngroups - 1)
    # ring of source masks: slot r % 3 holds row r; column nx flags "plane row has a source"
    src = np.zeros((3, nig, nx + 1), dtype=np.uint8)
    any_jump = np.zeros(nx, dtype=np.uint8)
    e = np.empty(nig, dtype=np.float32)
    fd = np.empty(n, dtype=np.float64)
    work = np.empty(n, dtype=np.float64)
    start1 = np.zeros(ngroups, dtype=np.bool_)
    start2 = np.zeros(ngroups, dtype=np.bool_)
    for y in range(ny):
        if y == 0:
            crs[y] = _neighbour_sources(data, gdq, gain, readnoise, nframes, y, flag_neighbours,
                                        nb_min, nb_max, any_jump, e, fd, work, src[0])
        nxt = src[(y + 1) % 3]
        if y + 1 < ny:
            crs[y + 1] = _neighbour_sources(data, gdq, gain, readnoise, nframes, y + 1,
                                            flag_neighbours, nb_min, nb_max, any_jump, e, fd,
                                            work, nxt)
        else:
            _zero_rows(nxt)
        if flag_neighbours:
            _flag_neighbours(gdq, y, src[(y + 2) % 3], src[y % 3], nxt)
        if after_jump:
            _flag_after_jumps(data, gdq, gain, y, e1, n1, e2, n2, any_jump, e, fd, work,
                              start1, start2)
        jumps_after[y] = _clear_redundant_row(gdq, y)
