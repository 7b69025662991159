"""NIRCam detector geometry, readout timing and synthetic per-pixel properties.

Everything here is deterministic. Pixel properties (bias, gain, read noise, dark current,
QE, non-linearity, full well, defects) are a pure function of ``(seed, detector, pixel)``:
each value comes from a counter-based hash of the pixel's full-frame position, so a
subarray cut-out is bit-identical to the same pixels of a full-frame map, and any window
can be generated on its own without building the full frame.

Coordinates: "DMS" (science) frame, 0-based, full-frame pixel ``(y, x)`` with
``0 <= y, x < 2048``; arrays are ``(ny, nx)`` windows starting at ``(y0, x0)``.
The detector (readout) frame differs by axis flips given by FASTAXIS/SLOWAXIS; amplifier
columns, odd/even columns and row timing are defined in the detector frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numba
import numpy as np

from .. import dqflags

FULL_SIZE = 2048
REF_BORDER = 4
AMP_WIDTH = 512
SAMPLE_TIME_US = 10.0
ATOD_MAX = 65535

# --------------------------------------------------------------------------------------
# Detectors
# --------------------------------------------------------------------------------------

#: NIRCam detectors in a fixed order (the order fixes reference-file serial numbers).
DETECTORS: tuple[str, ...] = (
    "NRCA1", "NRCA2", "NRCA3", "NRCA4", "NRCALONG",
    "NRCB1", "NRCB2", "NRCB3", "NRCB4", "NRCBLONG",
)

# SIAF DetSciYAngle per detector (all NIRCam SCAs have DetSciParity = -1).
_DET_SCI_ANGLE = {
    "NRCA1": 0, "NRCA2": 180, "NRCA3": 0, "NRCA4": 180, "NRCALONG": 0,
    "NRCB1": 180, "NRCB2": 0, "NRCB3": 180, "NRCB4": 0, "NRCBLONG": 180,
}

# SIAF full-frame aperture reference point (V2Ref, V3Ref [arcsec], V3IdlYAngle [deg]).
# LONG values are approximate (module centres).
_V2V3_REF = {
    "NRCA1": (120.521931, -527.681271, -0.57873665),
    "NRCA2": (119.668749, -459.968346, -0.21514994),
    "NRCA3": (51.905905, -528.126746, 0.26908435),
    "NRCA4": (52.295020, -460.099830, 0.07724494),
    "NRCALONG": (86.10, -493.23, -0.12),
    "NRCB1": (-122.636754, -457.771697, 0.28424495),
    "NRCB2": (-122.873335, -525.486255, 0.81935905),
    "NRCB3": (-54.829507, -457.752694, -0.48866820),
    "NRCB4": (-54.586077, -525.676157, -0.36941911),
    "NRCBLONG": (-89.15, -491.67, 0.22),
}


@dataclass(frozen=True)
class DetectorInfo:
    """Static description of one NIRCam SCA."""

    name: str
    index: int          # position in DETECTORS
    module: str         # 'A' | 'B'
    channel: str        # 'SHORT' | 'LONG'
    fastaxis: int       # FASTAXIS keyword (+-1)
    slowaxis: int       # SLOWAXIS keyword (+-2)
    sca_num: int
    pixel_scale: float  # arcsec / pixel
    v2_ref: float       # arcsec
    v3_ref: float       # arcsec
    v3_yangle: float    # deg
    vparity: int = -1


def detector_info(name: str) -> DetectorInfo:
    """Geometry of detector ``name`` (e.g. 'NRCA1'); raises KeyError for unknown names."""
    name = name.upper()
    if name not in _DET_SCI_ANGLE:
        raise KeyError(f"unknown NIRCam detector {name!r}; expected one of {DETECTORS}")
    angle = _DET_SCI_ANGLE[name]
    long = name.endswith("LONG")
    v2, v3, yang = _V2V3_REF[name]
    return DetectorInfo(
        name=name,
        index=DETECTORS.index(name),
        module=name[3],
        channel="LONG" if long else "SHORT",
        fastaxis=-1 if angle == 0 else 1,
        slowaxis=2 if angle == 0 else -2,
        sca_num=481 + DETECTORS.index(name),
        pixel_scale=0.063 if long else 0.031,
        v2_ref=v2, v3_ref=v3, v3_yangle=yang,
    )


# --------------------------------------------------------------------------------------
# Subarrays
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Subarray:
    """A readout window in full-frame DMS pixels (SUBSTRT are 1-based, as in FITS)."""

    name: str
    xstart: int
    ystart: int
    xsize: int
    ysize: int
    noutputs: int

    @property
    def x0(self) -> int:
        """0-based first column."""
        return self.xstart - 1

    @property
    def y0(self) -> int:
        """0-based first row."""
        return self.ystart - 1

    @property
    def shape(self) -> tuple[int, int]:
        return (self.ysize, self.xsize)

    @property
    def is_full(self) -> bool:
        return self.xsize == FULL_SIZE and self.ysize == FULL_SIZE


# name -> (xsize, ysize, noutputs)
_SUBARRAY_SIZES = {
    "FULL": (2048, 2048, 4),
    "SUB640": (640, 640, 1),
    "SUB320": (320, 320, 1),
    "SUB160": (160, 160, 1),
    "SUB64P": (64, 64, 1),
    "SUB160P": (160, 160, 1),
    "SUB400P": (400, 400, 1),
    "SUBGRISM64": (2048, 64, 4),
    "SUBGRISM128": (2048, 128, 4),
    "SUBGRISM256": (2048, 256, 4),
}
SUBARRAYS: tuple[str, ...] = tuple(_SUBARRAY_SIZES)

# SIAF subarray reference points: (XDetRef, YDetRef) of the subarray centre in the
# detector frame, per orientation class of the SCA.  For SUB160/320/640 the SIAF puts the
# window at the module-centre corner: det x small for A1/A4/B1/B4 (and LONG), large for
# A2/A3/B2/B3; det y always large.  Point-source subarrays use the NRCA3 (angle 0) and
# NRCB1 (angle 180) SIAF positions; other detectors reuse the position of the SCA with the
# same orientation (synthetic placement, documented as such).
_SMALL_X_DETS = {"NRCA1", "NRCA4", "NRCB1", "NRCB4", "NRCALONG", "NRCBLONG"}
_P_DET_REF = {  # orientation angle -> name -> (XDetRef, YDetRef, XSciRef, YSciRef)
    0: {"SUB64P": (2016.5, 132.5, 32.5, 32.5), "SUB160P": (80.5, 80.5, 80.5, 80.5),
        "SUB400P": (200.5, 200.5, 200.5, 200.5)},
    180: {"SUB64P": (1882.31, 202.78, 32.31, 30.22), "SUB160P": (1882.31, 202.78, 80.31, 78.22),
          "SUB400P": (1882.31, 202.78, 234.31, 198.22)},
}


def _det_to_sci(angle: int, xdet: float, ydet: float) -> tuple[float, float]:
    """Full-frame detector -> science (DMS) 1-based coordinates (DetSciParity = -1)."""
    if angle == 0:
        return FULL_SIZE + 1 - xdet, ydet
    return xdet, FULL_SIZE + 1 - ydet


def subarray_for(detector: str, name: str) -> Subarray:
    """The subarray ``name`` on ``detector`` with SIAF-derived SUBSTRT1/2."""
    name = name.upper()
    if name not in _SUBARRAY_SIZES:
        raise KeyError(f"unknown NIRCam subarray {name!r}; expected one of {SUBARRAYS}")
    xsize, ysize, nout = _SUBARRAY_SIZES[name]
    det = detector_info(detector)
    angle = _DET_SCI_ANGLE[det.name]
    if name == "FULL":
        return Subarray(name, 1, 1, xsize, ysize, nout)
    if name.startswith("SUBGRISM"):
        return Subarray(name, 1, 1, xsize, ysize, nout)
    if name in ("SUB160", "SUB320", "SUB640"):
        half = xsize / 2.0
        xdet = half + 0.5 if det.name in _SMALL_X_DETS else FULL_SIZE - half + 0.5
        ydet = FULL_SIZE - half + 0.5
        xref = yref = half + 0.5
    else:
        xdet, ydet, xref, yref = _P_DET_REF[angle][name]
    xsci, ysci = _det_to_sci(angle, xdet, ydet)
    xstart = int(round(xsci - xref + 1.0))
    ystart = int(round(ysci - yref + 1.0))
    return Subarray(name, xstart, ystart, xsize, ysize, nout)


def frame_time(sub: Subarray) -> float:
    """NIRCam frame time [s]: (columns per output + 12) x (rows + 1|2) x 10 us."""
    extra_rows = 1 if sub.noutputs == 4 else 2
    return (sub.xsize // sub.noutputs + 12) * (sub.ysize + extra_rows) * SAMPLE_TIME_US * 1e-6


# --------------------------------------------------------------------------------------
# Readout patterns
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReadPattern:
    """NIRCam MULTIACCUM pattern: frames averaged per group and frames dropped between."""

    name: str
    nframes: int
    groupgap: int
    max_ngroups: int

    def total_frames(self, ngroups: int) -> int:
        """Frames clocked in one integration (read + dropped), without the reset."""
        return ngroups * self.nframes + (ngroups - 1) * self.groupgap

    def read_frames(self, ngroups: int) -> np.ndarray:
        """(ngroups, nframes) 0-based indices of the frames averaged into each group."""
        step = self.nframes + self.groupgap
        return np.arange(ngroups)[:, None] * step + np.arange(self.nframes)[None, :]


READ_PATTERNS: dict[str, ReadPattern] = {
    p.name: p for p in (
        ReadPattern("RAPID", 1, 0, 10),
        ReadPattern("BRIGHT1", 1, 1, 10),
        ReadPattern("BRIGHT2", 2, 0, 10),
        ReadPattern("SHALLOW2", 2, 3, 10),
        ReadPattern("SHALLOW4", 4, 1, 10),
        ReadPattern("MEDIUM2", 2, 8, 10),
        ReadPattern("MEDIUM8", 8, 2, 10),
        ReadPattern("DEEP2", 2, 18, 20),
        ReadPattern("DEEP8", 8, 12, 20),
    )
}


def read_pattern(name: str) -> ReadPattern:
    """Look up a NIRCam readout pattern by name (case-insensitive)."""
    try:
        return READ_PATTERNS[name.upper()]
    except KeyError:
        raise KeyError(f"unknown NIRCam readout pattern {name!r}; expected one of "
                       f"{tuple(READ_PATTERNS)}") from None


# --------------------------------------------------------------------------------------
# Detector <-> DMS index helpers
# --------------------------------------------------------------------------------------

def detector_columns(info: DetectorInfo, x0: int, nx: int) -> np.ndarray:
    """Full-frame detector-frame column of each DMS column ``x0 .. x0+nx-1`` (int64)."""
    x = np.arange(x0, x0 + nx)
    return (FULL_SIZE - 1 - x) if info.fastaxis < 0 else x


def detector_rows(info: DetectorInfo, y0: int, ny: int) -> np.ndarray:
    """Full-frame detector-frame row of each DMS row ``y0 .. y0+ny-1`` (int64)."""
    y = np.arange(y0, y0 + ny)
    return (FULL_SIZE - 1 - y) if info.slowaxis < 0 else y


def readout_columns(info: DetectorInfo, sub: Subarray) -> tuple[np.ndarray, np.ndarray]:
    """Per DMS column of ``sub``: (output amplifier index, column parity 0/1) as read out.

    Parity is that of the column index in the detector-frame readout of the window (the
    convention jwst's refpix uses); amplifiers are 512-column stripes for 4 outputs and a
    single output otherwise.
    """
    det_cols = detector_columns(info, sub.x0, sub.xsize)
    local = det_cols - det_cols.min()
    amp = local // AMP_WIDTH if sub.noutputs == 4 else np.zeros_like(local)
    return amp.astype(np.int64), (local % 2).astype(np.int64)


# --------------------------------------------------------------------------------------
# Counter-based random numbers (numba)
# --------------------------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@numba.njit(cache=True, nogil=True, inline="always")
def _mix64(z: np.uint64) -> np.uint64:
    """splitmix64 finaliser: a well-mixed 64-bit hash of ``z``."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True, nogil=True, inline="always")
def _uniform(base: np.uint64, idx: np.int64) -> float:
    """Uniform deviate in (0, 1) for counter ``idx`` of stream ``base``."""
    z = _mix64(base + np.uint64(idx) * np.uint64(0x9E3779B97F4A7C15))
    return ((z >> np.uint64(11)) + 0.5) * (1.0 / 9007199254740992.0)


@numba.njit(cache=True, nogil=True, inline="always")
def _gauss4(base: np.uint64, idx: np.int64) -> float:
    """Cheap approximately normal deviate (mean 0, sigma 1, bounded at +-3.46).

    Irwin-Hall sum of the four 16-bit quarters of one hash; used for smooth per-pixel
    property scatter where tails do not matter.
    """
    z = _mix64(base + np.uint64(idx) * np.uint64(0x9E3779B97F4A7C15))
    m = np.uint64(0xFFFF)
    s = (z & m) + ((z >> np.uint64(16)) & m) + ((z >> np.uint64(32)) & m) + (z >> np.uint64(48))
    return (np.float64(s) * (1.0 / 65536.0) - 2.0) * 1.7320508075688772


def _mix64_py(z: int) -> int:
    """Pure-Python splitmix64 finaliser (same as ``_mix64``)."""
    m = (1 << 64) - 1
    z &= m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def stream_key(*parts: int | str) -> np.uint64:
    """A 64-bit stream key from integers/strings (stable across runs and platforms)."""
    z = 0x243F6A8885A308D3
    for part in parts:
        if isinstance(part, str):
            value = 0
            for ch in part.encode():
                value = (value * 131 + ch) % (1 << 61)
        else:
            value = int(part) % (1 << 64)
        z = _mix64_py((z ^ value) + 0x9E3779B97F4A7C15)
    return np.uint64(z)


# --------------------------------------------------------------------------------------
# Synthetic per-pixel properties
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DetectorParams:
    """Knobs of the synthetic detector model (units in the field names/comments)."""

    bias_level: float = 12500.0        # DN, mean amplifier bias
    bias_amp_spread: float = 500.0     # DN, sigma of per-amplifier offsets
    bias_col_sigma: float = 40.0       # DN, column structure
    bias_pix_sigma: float = 120.0      # DN, pixel structure
    gain_sw: float = 2.05              # e-/DN
    gain_lw: float = 1.82              # e-/DN
    gain_amp_spread: float = 0.04      # e-/DN
    gain_pix_sigma: float = 0.015      # fractional
    rn_cds_sw: float = 10.0            # DN, CDS read noise (what READNOISE refs hold)
    rn_cds_lw: float = 9.0             # DN
    rn_amp_spread: float = 0.3         # DN (amplifiers of one detector agree to a few %)
    rn_pix_sigma: float = 0.08         # fractional
    noisy_fraction: float = 3e-3       # pixels with 2.5x read noise
    dark_e: float = 0.003              # e-/s, median dark current
    dark_log_sigma: float = 0.4        # lognormal width
    warm_fraction: float = 1.5e-3      # 0.05 .. 0.5 e-/s, flagged WARM
    hot_fraction: float = 3e-4         # 0.5 .. 50 e-/s, flagged HOT
    hot_dnu_e: float = 5.0             # e-/s above which HOT pixels are also DO_NOT_USE
    dead_fraction: float = 2e-4        # QE = 0, DEAD + DO_NOT_USE
    lowqe_fraction: float = 5e-4       # QE 0.2 .. 0.7, LOW_QE
    qe_sigma: float = 0.02             # pixel-to-pixel response (flat field)
    other_bad_fraction: float = 1e-4   # OTHER_BAD_PIXEL + DO_NOT_USE (unstable pixels)
    lin_c2: float = 2.7e-6             # 1/DN, quadratic correction term
    lin_c2_sigma: float = 0.06         # fractional
    lin_c3: float = 2.0e-11            # 1/DN^2
    lin_c4: float = -1.0e-16           # 1/DN^3
    well_dn: float = 42000.0           # raw DN above bias at hard saturation
    well_sigma: float = 0.04           # fractional
    sat_fraction: float = 0.96         # saturation-reference threshold / well
    no_lin_fraction: float = 1e-4      # NO_LIN_CORR, linear response, coeffs (0,1,0,0,0)
    nan_lin_fraction: float = 3e-5     # NaN coefficients (unflagged), linear response
    no_sat_fraction: float = 1e-4      # NO_SAT_CHECK, NaN threshold
    bad_bias_fraction: float = 5e-5    # UNRELIABLE_BIAS in the superbias DQ


# Quantity ids for hash streams.
_Q_BIAS, _Q_BCOL, _Q_GAIN, _Q_RN, _Q_NOISY, _Q_DARK, _Q_DEFECT, _Q_DEFVAL, _Q_QE, \
    _Q_C2, _Q_WELL, _Q_SPECIAL = range(12)


@dataclass
class PixelMaps:
    """Per-pixel truth for a window of a detector (all (ny, nx) unless noted)."""

    detector: str
    y0: int
    x0: int
    superbias: np.ndarray      # float32 DN
    gain: np.ndarray           # float32 e-/DN (calibrated gain of the first context)
    readnoise: np.ndarray      # float32 DN, CDS
    dark_rate: np.ndarray      # float32 DN/s (intrinsic dark signal rate)
    qe: np.ndarray             # float32 relative response (0 = dead, 0 for reference pixels)
    coeffs: np.ndarray         # float32 (5, ny, nx) linearity correction polynomial
    well: np.ndarray           # float32 raw DN above bias at hard saturation
    sat_thresh: np.ndarray     # float32 DN incl. bias (NaN = no check)
    is_ref: np.ndarray         # bool, reference-pixel border
    mask_dq: np.ndarray        # uint32 pipeline bits
    sat_dq: np.ndarray         # uint32
    lin_dq: np.ndarray         # uint32
    bias_dq: np.ndarray        # uint32
    dark_dq: np.ndarray        # uint32
    amp_gain: np.ndarray = field(default_factory=lambda: np.zeros(4))  # e-/DN per output

    @property
    def shape(self) -> tuple[int, int]:
        return self.superbias.shape


def _amp_constants(seed: int, info: DetectorInfo, p: DetectorParams) -> dict[str, np.ndarray]:
    """Per-output (4) bias offset, gain and read noise of a detector."""
    rng = np.random.default_rng([int(seed) % (1 << 32), 7919, info.index])
    gain0 = p.gain_lw if info.channel == "LONG" else p.gain_sw
    rn0 = p.rn_cds_lw if info.channel == "LONG" else p.rn_cds_sw
    return {
        "bias": (p.bias_level + p.bias_amp_spread * rng.standard_normal(4)).astype(np.float64),
        "gain": (gain0 + p.gain_amp_spread * rng.standard_normal(4)).astype(np.float64),
        "rn": (rn0 + p.rn_amp_spread * rng.standard_normal(4)).clip(0.5 * rn0).astype(np.float64),
    }


@numba.njit(cache=True, nogil=True)
def _pixel_maps_kernel(key, y0, x0, det_cols, amp_bias, amp_gain, amp_rn, prm, flags,
                       superbias, gain, rn, dark, qe, coeffs, well, sat, is_ref,
                       mask_dq, sat_dq, lin_dq, bias_dq, dark_dq):
    """Fill all per-pixel property arrays of a window (see PixelMaps for units).

    ``prm`` is a float64 vector of DetectorParams values in _PARAM_ORDER, ``flags`` the
    uint32 pipeline flag values in _FLAG_ORDER; ``det_cols`` maps window columns to
    detector-frame columns (amplifier membership).
    """
    ny, nx = superbias.shape
    (bias_col_sigma, bias_pix_sigma, gain_pix_sigma, rn_pix_sigma, noisy_fraction,
     dark_e, dark_log_sigma, warm_fraction, hot_fraction, hot_dnu_e, dead_fraction,
     lowqe_fraction, qe_sigma, other_bad_fraction, lin_c2, lin_c2_sigma, lin_c3, lin_c4,
     well_dn, well_sigma, sat_fraction, no_lin_fraction, nan_lin_fraction, no_sat_fraction,
     bad_bias_fraction) = (prm[0], prm[1], prm[2], prm[3], prm[4], prm[5], prm[6], prm[7],
                           prm[8], prm[9], prm[10], prm[11], prm[12], prm[13], prm[14],
                           prm[15], prm[16], prm[17], prm[18], prm[19], prm[20], prm[21],
                           prm[22], prm[23], prm[24])
    (DO_NOT_USE, DEAD, HOT, WARM, LOW_QE, OTHER_BAD, REFPIX, NO_LIN, NO_SAT, UNREL_BIAS,
     UNREL_DARK) = (flags[0], flags[1], flags[2], flags[3], flags[4], flags[5], flags[6],
                    flags[7], flags[8], flags[9], flags[10])
    bases = np.empty(12, dtype=np.uint64)
    for q in range(12):
        bases[q] = _mix64(key ^ (np.uint64(q + 1) * np.uint64(0xD1B54A32D192ED03)))
    full = 2048
    border = 4
    for i in range(ny):
        y = y0 + i
        for j in range(nx):
            x = x0 + j
            pix = np.int64(y) * full + x
            amp = det_cols[j] // 512
            ref = y < border or y >= full - border or x < border or x >= full - border
            is_ref[i, j] = ref
            # bias
            b = amp_bias[amp] + bias_col_sigma * _gauss4(bases[1], x) \
                + bias_pix_sigma * _gauss4(bases[0], pix)
            superbias[i, j] = b
            # gain and read noise
            g = amp_gain[amp] * (1.0 + gain_pix_sigma * _gauss4(bases[2], pix))
            gain[i, j] = g
            r = amp_rn[amp] * (1.0 + rn_pix_sigma * _gauss4(bases[3], pix))
            if _uniform(bases[4], pix) < noisy_fraction:
                r *= 2.5
            rn[i, j] = max(r, 0.5)
            mdq = np.uint32(0)
            ddq = np.uint32(0)
            # dark current [e-/s] and defects, decided by one uniform per pixel
            d_e = dark_e * math.exp(dark_log_sigma * _gauss4(bases[5], pix))
            u = _uniform(bases[6], pix)
            v = _uniform(bases[7], pix)
            q = 1.0 + qe_sigma * _gauss4(bases[8], pix)
            c = hot_fraction
            if u < c:
                d_e = 0.5 * math.exp(v * math.log(100.0))          # 0.5 .. 50 e-/s
                mdq |= HOT
                ddq |= HOT
                if d_e > hot_dnu_e:
                    mdq |= DO_NOT_USE
                    ddq |= UNREL_DARK
            elif u < c + warm_fraction:
                d_e = 0.05 * math.exp(v * math.log(10.0))          # 0.05 .. 0.5 e-/s
                mdq |= WARM
                ddq |= WARM
            elif u < c + warm_fraction + dead_fraction:
                q = 0.0
                mdq |= DEAD | DO_NOT_USE
            elif u < c + warm_fraction + dead_fraction + lowqe_fraction:
                q = 0.2 + 0.5 * v
                mdq |= LOW_QE
            elif u < c + warm_fraction + dead_fraction + lowqe_fraction + other_bad_fraction:
                mdq |= OTHER_BAD | DO_NOT_USE
            if ref:
                q = 0.0
                d_e = 0.0
                mdq = REFPIX
                ddq = np.uint32(0)
            qe[i, j] = q
            dark[i, j] = d_e / g
            # non-linearity, full well, saturation, special flags
            c2 = lin_c2 * (1.0 + lin_c2_sigma * _gauss4(bases[9], pix))
            w = well_dn * (1.0 + well_sigma * _gauss4(bases[10], pix))
            w = min(w, 65535.0 - b - 500.0)
            well[i, j] = w
            coeffs[0, i, j] = 0.0
            coeffs[1, i, j] = 1.0
            coeffs[2, i, j] = c2
            coeffs[3, i, j] = lin_c3
            coeffs[4, i, j] = lin_c4
            s = _uniform(bases[11], pix)
            ldq = np.uint32(0)
            sdq = np.uint32(0)
            bdq = np.uint32(0)
            st = b + sat_fraction * w
            if s < no_lin_fraction:
                coeffs[2, i, j] = 0.0
                coeffs[3, i, j] = 0.0
                coeffs[4, i, j] = 0.0
                ldq |= NO_LIN
            elif s < no_lin_fraction + nan_lin_fraction:
                for k in range(5):
                    coeffs[k, i, j] = np.nan
            elif s < no_lin_fraction + nan_lin_fraction + no_sat_fraction:
                st = np.nan
                sdq |= NO_SAT
            elif s < no_lin_fraction + nan_lin_fraction + no_sat_fraction + bad_bias_fraction:
                bdq |= UNREL_BIAS
            sat[i, j] = st
            mask_dq[i, j] = mdq
            dark_dq[i, j] = ddq
            lin_dq[i, j] = ldq
            sat_dq[i, j] = sdq
            bias_dq[i, j] = bdq


_PARAM_ORDER = (
    "bias_col_sigma", "bias_pix_sigma", "gain_pix_sigma", "rn_pix_sigma", "noisy_fraction",
    "dark_e", "dark_log_sigma", "warm_fraction", "hot_fraction", "hot_dnu_e",
    "dead_fraction", "lowqe_fraction", "qe_sigma", "other_bad_fraction", "lin_c2",
    "lin_c2_sigma", "lin_c3", "lin_c4", "well_dn", "well_sigma", "sat_fraction",
    "no_lin_fraction", "nan_lin_fraction", "no_sat_fraction", "bad_bias_fraction",
)
_FLAG_ORDER = ("DO_NOT_USE", "DEAD", "HOT", "WARM", "LOW_QE", "OTHER_BAD_PIXEL",
               "REFERENCE_PIXEL", "NO_LIN_CORR", "NO_SAT_CHECK", "UNRELIABLE_BIAS",
               "UNRELIABLE_DARK")


def pixel_maps(detector: str, seed: int, y0: int = 0, x0: int = 0,
               ny: int = FULL_SIZE, nx: int = FULL_SIZE,
               params: DetectorParams | None = None) -> PixelMaps:
    """Synthetic per-pixel properties of ``detector`` for the DMS window at (y0, x0).

    Deterministic in (seed, detector, params); any window equals the same pixels of the
    full-frame maps.  Cost ~0.1 s per million pixels.
    """
    p = params or DetectorParams()
    info = detector_info(detector)
    if not (0 <= y0 and 0 <= x0 and y0 + ny <= FULL_SIZE and x0 + nx <= FULL_SIZE):
        raise ValueError(f"window ({y0},{x0},{ny},{nx}) outside the 2048x2048 detector")
    amps = _amp_constants(seed, info, p)
    key = stream_key("pixel-maps", int(seed), info.name)
    prm = np.array([getattr(p, n) for n in _PARAM_ORDER], dtype=np.float64)
    flags = np.array([dqflags.PIXEL[n] for n in _FLAG_ORDER], dtype=np.uint32)
    f4 = lambda: np.empty((ny, nx), dtype=np.float32)  # noqa: E731
    u4 = lambda: np.empty((ny, nx), dtype=np.uint32)  # noqa: E731
    maps = PixelMaps(
        detector=info.name, y0=y0, x0=x0, superbias=f4(), gain=f4(), readnoise=f4(),
        dark_rate=f4(), qe=f4(), coeffs=np.empty((5, ny, nx), dtype=np.float32), well=f4(),
        sat_thresh=f4(), is_ref=np.empty((ny, nx), dtype=np.bool_), mask_dq=u4(),
        sat_dq=u4(), lin_dq=u4(), bias_dq=u4(), dark_dq=u4(), amp_gain=amps["gain"],
    )
    det_cols = detector_columns(info, x0, nx).astype(np.int64)
    _pixel_maps_kernel(key, y0, x0, det_cols, amps["bias"], amps["gain"], amps["rn"], prm,
                       flags, maps.superbias, maps.gain, maps.readnoise, maps.dark_rate,
                       maps.qe, maps.coeffs, maps.well, maps.sat_thresh, maps.is_ref,
                       maps.mask_dq, maps.sat_dq, maps.lin_dq, maps.bias_dq, maps.dark_dq)
    return maps


# --------------------------------------------------------------------------------------
# Calibration history: the gain change that distinguishes the two CRDS contexts
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GainChange:
    """From ``date`` on, ``detector``'s true gain is ``factor`` x the original one."""

    detector: str = "NRCA1"
    date: str = "2024-01-01 00:00:00"
    factor: float = 1.03


GAIN_CHANGE = GainChange()


def gain_factor(detector: str, date_time: str, change: GainChange = GAIN_CHANGE) -> float:
    """Multiplier of the original gain map in effect at ``date_time`` ('YYYY-MM-DD HH:MM:SS')."""
    if detector.upper() == change.detector and date_time.replace("T", " ") >= change.date:
        return change.factor
    return 1.0


# --------------------------------------------------------------------------------------
# Non-linearity
# --------------------------------------------------------------------------------------

@numba.njit(cache=True, nogil=True, inline="always")
def _poly5(c0, c1, c2, c3, c4, r):
    return c0 + r * (c1 + r * (c2 + r * (c3 + r * c4)))


@numba.njit(cache=True, nogil=True, inline="always")
def raw_from_linear(lin, c0, c1, c2, c3, c4, well, lin_well):
    """Raw DN (above bias) whose linearity correction is ``lin``; ``well`` when
    ``lin >= lin_well`` (= f(well)); NaN ``c0`` means a linear pixel.

    Newton iterations on f(r) = c0 + c1 r + ... + c4 r^4 from r0 = lin / (c1 + c2 lin),
    stopped when |f(r) - lin| < 1e-3 DN (<= 3 steps for NIRCam-like non-linearity).
    """
    if lin >= lin_well:
        return well
    if not np.isfinite(c0):
        return lin
    r = lin / (c1 + c2 * lin)
    for _ in range(3):
        f = _poly5(c0, c1, c2, c3, c4, r) - lin
        if abs(f) < 1e-3:
            break
        r -= f / (c1 + r * (2.0 * c2 + r * (3.0 * c3 + r * 4.0 * c4)))
    return r


@numba.njit(cache=True, nogil=True)
def linear_at_well(coeffs, well, out):
    """Linear DN at which each pixel hard-saturates, f(well) (NaN coefficients: well)."""
    ny, nx = well.shape
    for i in range(ny):
        for j in range(nx):
            w = well[i, j]
            c0 = coeffs[0, i, j]
            if np.isfinite(c0):
                out[i, j] = _poly5(c0, coeffs[1, i, j], coeffs[2, i, j], coeffs[3, i, j],
                                   coeffs[4, i, j], w)
            else:
                out[i, j] = w


@numba.njit(cache=True, nogil=True)
def invert_linearity(linear, coeffs, well, out):
    """Raw (non-linear) DN whose linearity correction gives ``linear``.

    ``linear``: (ny, nx) linear DN above bias; ``coeffs``: (5, ny, nx) correction polynomial
    (NaN = linear); ``well``: (ny, nx) raw DN at hard saturation (the result is clipped
    there).  Writes ``out`` (ny, nx).
    """
    ny, nx = linear.shape
    for i in range(ny):
        for j in range(nx):
            c0 = coeffs[0, i, j]
            w = well[i, j]
            lw = w
            if np.isfinite(c0):
                lw = _poly5(c0, coeffs[1, i, j], coeffs[2, i, j], coeffs[3, i, j],
                            coeffs[4, i, j], w)
            out[i, j] = raw_from_linear(linear[i, j], c0, coeffs[1, i, j], coeffs[2, i, j],
                                        coeffs[3, i, j], coeffs[4, i, j], w, lw)


def subarray_cards(sub, info, name: str) -> list[tuple[str, object, str]]:
    """SUBARRAY, SUBSTRT1/2, SUBSIZE1/2, FASTAXIS, SLOWAXIS header cards for a subarray."""
    return [
        ("SUBARRAY", name, "Subarray used"),
        ("SUBSTRT1", sub.xstart, "Starting pixel in axis 1 direction"),
        ("SUBSTRT2", sub.ystart, "Starting pixel in axis 2 direction"),
        ("SUBSIZE1", sub.xsize, "Number of pixels in axis 1 direction"),
        ("SUBSIZE2", sub.ysize, "Number of pixels in axis 2 direction"),
        ("FASTAXIS", info.fastaxis, "Fast readout axis direction"),
        ("SLOWAXIS", info.slowaxis, "Slow readout axis direction"),
    ]
