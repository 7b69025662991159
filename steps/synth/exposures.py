"""Synthetic NIRCam uncal exposures (Level-1b ramps) with a truth record.

Signal model, per pixel, frame by frame (electrons, then DN through the true gain):

* charge ``Q`` accumulates Poisson-distributed photo-electrons (QE x (sky + sources))
  and dark current, frame by frame (dropped frames included), plus cosmic-ray hits;
* the detector output is ``raw = f^-1(Q / gain)`` where ``f`` is the linearity
  reference's correction polynomial, clipped at the pixel's full well;
* ``DN = superbias + kTC(int) + raw + drift[output, column parity](frame)
  + 1/f(row read time) + read noise``, frames averaged into groups,
  rounded and clipped to uint16.

Reference pixels (4-pixel border) collect no charge but see bias, drifts, 1/f and read
noise.  Everything is consistent with the synthetic references of the same seed
(``references.py``), so calibrating with those recovers ``QE x scene / gain`` in DN/s.

Files follow the MAST layout (product-format.md): PRIMARY (all keywords), SCI uint16
(nints, ngroups, ny, nx) with BZERO=32768, GROUP and INT_TIMES tables (optionally
ZEROFRAME), written with astropy or, with ``via_datamodels=True``, re-saved by
stdatamodels' Level1bModel (adds the ASDF extension as MAST files have).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numba
import numpy as np
from astropy.io import fits
from astropy.time import Time

from .detector import (subarray_cards, DetectorInfo, DetectorParams, PixelMaps, ReadPattern, Subarray,
                       detector_info, detector_rows, frame_time, gain_factor, linear_at_well,
                       pixel_maps, raw_from_linear, read_pattern, readout_columns,
                       subarray_for)
from .scene import (Pointing, Scene, aperture_wcs, pa_aper, point_aperture, random_scene,
                    render_rate, subarray_v2v3)

# --------------------------------------------------------------------------------------
# Configuration and truth
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseParams:
    """Time-variable detector effects (DN unless stated)."""

    ktc_sigma: float = 15.0        # reset (kTC) level per pixel per integration
    drift_walk: float = 1.0        # per-frame random-walk step of output/parity offsets
    drift_white: float = 1.5       # per-frame white offset per output and parity
    one_over_f: float = 1.5        # rms of the 1/f series over one full-frame read
    cr_rate: float = 5e-5          # cosmic-ray events per pixel per second
    cr_charge: float = 1500.0      # e-, median charge of an event
    snowball_fraction: float = 2e-3


@dataclass(frozen=True)
class ExposureConfig:
    """One exposure on one detector (all segments)."""

    detector: str = "NRCA1"
    subarray: str = "SUB160"
    readpatt: str = "RAPID"
    ngroups: int = 10
    nints: int = 1
    nsegments: int = 1
    filter: str | None = None          # default F200W (SHORT) / F444W (LONG)
    pupil: str = "CLEAR"
    start: str = "2024-03-01T12:00:00.000"   # UTC, exposure start
    program: int = 1234
    observation: int = 1
    visit: int = 1
    visit_group: int = 2
    seq_id: int = 1
    activity: int = 1
    exposure: int = 1
    seed: int = 0
    sky: float = 3.0                   # e-/s/pixel before QE
    target_ra: float = 53.16
    target_dec: float = -27.78
    pa_v3: float = 45.0
    dither: tuple[float, float] = (0.0, 0.0)   # scene offset [pixels]
    zeroframe: bool = False
    noise: NoiseParams = NoiseParams()
    detector_params: DetectorParams = DetectorParams()

    @property
    def pattern(self) -> ReadPattern:
        return read_pattern(self.readpatt)


@dataclass
class ExposureTruth:
    """What went into an exposure (for tests and science checks)."""

    detector: str
    subarray: Subarray
    readpatt: str
    ngroups: int
    nints: int
    tframe: float
    tgroup: float
    gain_factor: float                 # true gain / gain map of the first context
    sky: float                         # e-/s/pixel before QE
    sky_rate_dn: float                 # median expected sky rate [DN/s] (QE x sky / gain)
    dark_rate_dn: float                # median dark rate [DN/s] of light-sensitive pixels
    sources: list[dict]                # id, kind, x, y (0-based in the array), flux [e-/s], ...
    cosmic_rays: np.ndarray            # structured: integration, frame, y, x, charge [e-]
    saturated_sources: list[int] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-friendly summary (cosmic rays as columns)."""
        return {
            "detector": self.detector, "subarray": self.subarray.name,
            "substrt": [self.subarray.xstart, self.subarray.ystart],
            "readpatt": self.readpatt, "ngroups": self.ngroups, "nints": self.nints,
            "tframe": self.tframe, "tgroup": self.tgroup, "gain_factor": self.gain_factor,
            "sky": self.sky, "sky_rate_dn": self.sky_rate_dn, "dark_rate_dn": self.dark_rate_dn,
            "sources": self.sources, "saturated_sources": self.saturated_sources,
            "cosmic_rays": {name: self.cosmic_rays[name].tolist()
                            for name in self.cosmic_rays.dtype.names},
            "paths": [str(p) for p in self.paths],
        }


CR_DTYPE = np.dtype([("integration", "i4"), ("frame", "i4"), ("y", "i4"), ("x", "i4"),
                     ("charge", "f4")])


# --------------------------------------------------------------------------------------
# Ramp kernels
# --------------------------------------------------------------------------------------

@numba.njit(cache=True, nogil=True)
def accumulate_charge(charge, rate, dt, uniform, normal):
    """Add one interval's Poisson electrons to ``charge`` in place.

    charge: (ny, nx) float32 e-; rate: (ny, nx) float32 e-/s; dt: s; uniform/normal:
    (ny, nx) float32 deviates.  Inverse-CDF Poisson for mean < 25, normal approximation
    (rounded, >= 0) above.
    """
    ny, nx = charge.shape
    for i in range(ny):
        for j in range(nx):
            lam = rate[i, j] * dt
            if lam <= 0.0:
                continue
            if lam < 25.0:
                u = uniform[i, j]
                p = math.exp(-lam)
                s = p
                k = 0
                while u > s and k < 200:
                    k += 1
                    p *= lam / k
                    s += p
                charge[i, j] += k
            else:
                v = math.floor(lam + math.sqrt(lam) * normal[i, j] + 0.5)
                if v > 0.0:
                    charge[i, j] += v


@numba.njit(cache=True, nogil=True)
def read_frame(acc, charge, inv_gain, coeffs, well, lin_well, bias, row_offset, col_offset,
               read_sigma, noise, is_ref):
    """Add one frame's DN readout to ``acc`` (float32 (ny, nx)) in place.

    raw = f^-1(charge x inv_gain) through :func:`detector.raw_from_linear` (``lin_well`` =
    f(well) from :func:`detector.linear_at_well`); DN = bias + raw + row_offset[i] +
    col_offset[j] + read_sigma x noise.  Reference pixels collect no signal.
    """
    ny, nx = acc.shape
    for i in range(ny):
        roff = row_offset[i]
        for j in range(nx):
            raw = 0.0
            if not is_ref[i, j]:
                raw = raw_from_linear(charge[i, j] * inv_gain[i, j], coeffs[0, i, j],
                                      coeffs[1, i, j], coeffs[2, i, j], coeffs[3, i, j],
                                      coeffs[4, i, j], well[i, j], lin_well[i, j])
            acc[i, j] += bias[i, j] + raw + roff + col_offset[j] + read_sigma[i, j] * noise[i, j]


@numba.njit(cache=True, nogil=True)
def quantize(acc, scale, out):
    """out = clip(round(acc x scale), 0, 65535) as uint16 (acc: (ny, nx) float32)."""
    ny, nx = acc.shape
    for i in range(ny):
        for j in range(nx):
            v = math.floor(acc[i, j] * scale + 0.5)
            if v < 0.0:
                v = 0.0
            elif v > 65535.0:
                v = 65535.0
            out[i, j] = np.uint16(v)


def pink_noise(rng: np.random.Generator, n: int, rms_ref: float, n_ref: int = 2049
               ) -> np.ndarray:
    """1/f noise series of ``n`` samples (float32).

    Power spectral density ~ 1/f between 1/n and the Nyquist frequency; normalised so a
    series of ``n_ref`` samples has an expected rms of ``rms_ref`` (the variance of 1/f
    noise grows with log(n)).
    """
    if n < 2 or rms_ref <= 0:
        return np.zeros(n, dtype=np.float32)
    k = np.arange(n // 2 + 1, dtype=float)
    k[0] = 1.0
    spec = (rng.standard_normal(k.size) + 1j * rng.standard_normal(k.size)) / np.sqrt(k)
    spec[0] = 0.0
    series = np.fft.irfft(spec, n)
    expected_var = 4.0 / n ** 2 * np.sum(1.0 / k[1:])
    harmonic = lambda m: np.sum(1.0 / np.arange(1, m // 2 + 1))  # noqa: E731
    target_var = rms_ref ** 2 * harmonic(n) / harmonic(n_ref)
    return (series * math.sqrt(target_var / expected_var)).astype(np.float32)


def row_time(sub: Subarray) -> float:
    """Seconds to read one detector row of ``sub`` (all outputs in parallel)."""
    return (sub.xsize // sub.noutputs + 12) * 10e-6


# --------------------------------------------------------------------------------------
# Cosmic rays
# --------------------------------------------------------------------------------------

def draw_cosmic_rays(rng: np.random.Generator, integration: int, ny: int, nx: int,
                     nframes_total: int, tframe: float, is_ref: np.ndarray,
                     noise: NoiseParams) -> np.ndarray:
    """Cosmic-ray deposits of one integration (CR_DTYPE rows, one per hit pixel).

    Events are uniform in space and time; each deposits a lognormal charge (median
    ``noise.cr_charge`` e-) in one pixel and 5-25% of it in up to two of its 4 neighbours;
    a fraction ``snowball_fraction`` are 'snowballs' (discs of radius 2-5 px with
    2e4-8e4 e- per pixel).  ``frame`` = first frame (0-based) that sees the charge.
    """
    t_int = nframes_total * tframe
    n = int(rng.poisson(noise.cr_rate * ny * nx * t_int))
    ys = rng.integers(0, ny, n)
    xs = rng.integers(0, nx, n)
    frames = rng.integers(0, nframes_total, n)
    charge = noise.cr_charge * np.exp(0.7 * rng.standard_normal(n))
    snow = rng.uniform(size=n) < noise.snowball_fraction
    nneigh = rng.integers(0, 3, n)
    dirs = rng.integers(0, 4, (n, 2))
    frac = rng.uniform(0.05, 0.25, (n, 2))
    step = np.array([(0, 1), (1, 0), (0, -1), (-1, 0)])
    parts = [(frames[~snow], ys[~snow], xs[~snow], charge[~snow])]
    for m in range(2):
        sel = ~snow & (nneigh > m)
        d = step[dirs[sel, m]]
        parts.append((frames[sel], ys[sel] + d[:, 0], xs[sel] + d[:, 1],
                      charge[sel] * frac[sel, m]))
    for idx in np.flatnonzero(snow):
        radius = rng.uniform(2.0, 5.0)
        core = rng.uniform(2e4, 8e4)
        r = int(math.ceil(radius))
        dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
        inside = dy ** 2 + dx ** 2 <= radius ** 2
        cnt = int(inside.sum())
        parts.append((np.full(cnt, frames[idx]), ys[idx] + dy[inside], xs[idx] + dx[inside],
                      np.full(cnt, core)))
    total = sum(len(p[0]) for p in parts)
    arr = np.zeros(total, dtype=CR_DTYPE)
    pos = 0
    for f, y, x, c in parts:
        k = len(f)
        arr["integration"][pos:pos + k] = integration
        arr["frame"][pos:pos + k] = f
        arr["y"][pos:pos + k] = y
        arr["x"][pos:pos + k] = x
        arr["charge"][pos:pos + k] = c
        pos += k
    inside = (arr["y"] >= 0) & (arr["y"] < ny) & (arr["x"] >= 0) & (arr["x"] < nx)
    arr = arr[inside]
    arr = arr[~is_ref[arr["y"], arr["x"]]]
    return arr[np.argsort(arr["frame"], kind="stable")]


# --------------------------------------------------------------------------------------
# Ramp simulation
# --------------------------------------------------------------------------------------

@dataclass
class RampInputs:
    """Per-pixel inputs of the ramp simulator for one exposure window."""

    maps: PixelMaps
    info: DetectorInfo
    sub: Subarray
    photo_rate: np.ndarray     # e-/s collected (QE x scene), (ny, nx) float32
    true_gain: np.ndarray      # e-/DN, (ny, nx) float32


def prepare_inputs(cfg: ExposureConfig, scene: Scene | None = None
                   ) -> tuple[RampInputs, Scene]:
    """Detector maps, scene and true gain for ``cfg``'s window."""
    info = detector_info(cfg.detector)
    sub = subarray_for(cfg.detector, cfg.subarray)
    maps = pixel_maps(info.name, cfg.seed, sub.y0, sub.x0, sub.ysize, sub.xsize,
                      cfg.detector_params)
    if scene is None:
        scene = random_scene(cfg.seed, sub, sky=cfg.sky,
                             psf_sigma=0.9 if info.channel == "SHORT" else 1.0)
        if cfg.dither != (0.0, 0.0):
            from .scene import shifted
            scene = shifted(scene, *cfg.dither)
    rate = render_rate(scene, sub.y0, sub.x0, sub.ysize, sub.xsize)
    photo = (rate * maps.qe).astype(np.float32)
    factor = gain_factor(info.name, cfg.start)
    return RampInputs(maps, info, sub, photo, (maps.gain * np.float32(factor))), scene


def simulate_integration(inp: RampInputs, pattern: ReadPattern, ngroups: int,
                         rng: np.random.Generator, crs: np.ndarray, noise: NoiseParams,
                         out: np.ndarray, zeroframe: np.ndarray | None = None) -> None:
    """Fill ``out`` (ngroups, ny, nx) uint16 with one integration's groups.

    ``crs``: this integration's CR_DTYPE rows; ``zeroframe``: optional (ny, nx) uint16
    receiving the first frame.
    """
    maps, sub = inp.maps, inp.sub
    ny, nx = maps.shape
    tframe = frame_time(sub)
    total = pattern.total_frames(ngroups)
    read = pattern.read_frames(ngroups)
    frame_group = np.full(total, -1, dtype=np.int64)
    for g in range(ngroups):
        frame_group[read[g]] = g
    dark_e = (maps.dark_rate * inp.true_gain).astype(np.float32)
    rate = (inp.photo_rate + dark_e).astype(np.float32)
    inv_gain = (1.0 / inp.true_gain).astype(np.float32)
    read_sigma = (maps.readnoise / np.float32(math.sqrt(2.0))).astype(np.float32)
    bias = (maps.superbias + np.float32(noise.ktc_sigma)
            * rng.standard_normal((ny, nx), dtype=np.float32)).astype(np.float32)
    amp, parity = readout_columns(inp.info, sub)
    namp = sub.noutputs
    det_rows = detector_rows(inp.info, sub.y0, ny)
    row_order = det_rows - det_rows.min()          # readout order of each DMS row
    rows_per_frame = int(round(tframe / row_time(sub)))
    one_f = pink_noise(rng, total * rows_per_frame, noise.one_over_f)
    lin_well = np.empty((ny, nx), dtype=np.float32)
    linear_at_well(maps.coeffs, maps.well, lin_well)
    walk = np.zeros((namp, 2))
    charge = np.zeros((ny, nx), dtype=np.float32)
    acc = np.zeros((ny, nx), dtype=np.float32)
    uni = np.empty((ny, nx), dtype=np.float32)
    nrm = np.empty((ny, nx), dtype=np.float32)
    cr_frames = crs["frame"] if len(crs) else np.zeros(0, dtype=np.int32)
    k = 0
    while k < total:
        g = frame_group[k]
        # dropped frames: accumulate the whole gap at once
        span = 1
        if g < 0:
            while k + span < total and frame_group[k + span] < 0:
                span += 1
        rng.random(dtype=np.float32, out=uni)
        rng.standard_normal(dtype=np.float32, out=nrm)
        accumulate_charge(charge, rate, tframe * span, uni, nrm)
        hits = crs[(cr_frames >= k) & (cr_frames < k + span)]
        if len(hits):
            np.add.at(charge, (hits["y"], hits["x"]), hits["charge"])
        walk += noise.drift_walk * rng.standard_normal((namp, 2)) * math.sqrt(span)
        if g >= 0:
            drift = walk + noise.drift_white * rng.standard_normal((namp, 2))
            col_offset = drift[amp, parity].astype(np.float32)
            row_offset = one_f[k * rows_per_frame + row_order]
            rng.standard_normal(dtype=np.float32, out=nrm)
            read_frame(acc, charge, inv_gain, maps.coeffs, maps.well, lin_well, bias, row_offset,
                       col_offset, read_sigma, nrm, maps.is_ref)
            if k == 0 and zeroframe is not None:
                quantize(acc, 1.0, zeroframe)
            if k == read[g, -1]:
                quantize(acc, 1.0 / pattern.nframes, out[g])
                acc[:] = 0.0
        k += span


# --------------------------------------------------------------------------------------
# Headers and tables
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    """Exposure timing [s] and MJD (UTC) start."""

    tframe: float
    tgroup: float
    frames_per_int: int
    t_int: float          # integration duration incl. one reset frame
    mjd_start: float


def exposure_timing(cfg: ExposureConfig) -> Timing:
    """Frame/group/integration times of ``cfg``."""
    sub = subarray_for(cfg.detector, cfg.subarray)
    pat = cfg.pattern
    tframe = frame_time(sub)
    frames = pat.total_frames(cfg.ngroups)
    return Timing(tframe=tframe, tgroup=(pat.nframes + pat.groupgap) * tframe,
                  frames_per_int=frames, t_int=(frames + 1) * tframe,
                  mjd_start=Time(cfg.start, scale="utc").mjd)


def exposure_basename(cfg: ExposureConfig, segment: int | None = None,
                      suffix: str = "uncal") -> str:
    """JWST file name, e.g. ``jw01234001001_02101_00001-seg001_nrca1_uncal.fits``."""
    seg = f"-seg{segment:03d}" if segment is not None else ""
    return (f"jw{cfg.program:05d}{cfg.observation:03d}{cfg.visit:03d}_{cfg.visit_group:02d}"
            f"{cfg.seq_id:1d}{cfg.activity:02d}_{cfg.exposure:05d}{seg}_"
            f"{cfg.detector.lower()}_{suffix}.fits")


def segment_bounds(nints: int, nsegments: int) -> list[tuple[int, int]]:
    """1-based inclusive (INTSTART, INTEND) per segment, integrations split evenly."""
    nsegments = max(1, min(nsegments, nints))
    edges = np.linspace(0, nints, nsegments + 1).round().astype(int)
    return [(int(edges[i]) + 1, int(edges[i + 1])) for i in range(nsegments)]


def _iso(mjd: float) -> str:
    return Time(mjd, format="mjd", scale="utc").isot


def primary_header(cfg: ExposureConfig, timing: Timing, seg: tuple[int, int],
                   segnum: int, nseg: int, filename: str) -> fits.Header:
    """Primary header of one uncal segment (the keywords Level1bModel/detector1 read)."""
    info = detector_info(cfg.detector)
    sub = subarray_for(cfg.detector, cfg.subarray)
    pat = cfg.pattern
    mjd0 = timing.mjd_start
    mjd_end = mjd0 + cfg.nints * timing.t_int / 86400.0
    beg = _iso(mjd0)
    end = _iso(mjd_end)
    effint = (cfg.ngroups - 1) * timing.tgroup
    filt = cfg.filter or ("F200W" if info.channel == "SHORT" else "F444W")
    v2, v3 = subarray_v2v3(info, sub)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
    prog = f"{cfg.program:05d}"
    obs = f"{cfg.observation:03d}"
    vis = f"{cfg.visit:03d}"
    cards = [
        ("DATE", now, "UTC date file created"),
        ("ORIGIN", "CALSTREAM", "Organization responsible for creating file"),
        ("TIMESYS", "UTC", "principal time system for time-related keywords"),
        ("TIMEUNIT", "s", "Default unit applicable to all time values"),
        ("FILENAME", filename, "Name of the file"),
        ("FILETYPE", "uncalibrated", "Type of data in the file"),
        ("SDP_VER", "calstream-synth", "Data processing software version number"),
        ("DATAMODL", "Level1bModel", "Type of data model"),
        ("TELESCOP", "JWST", "Telescope used to acquire the data"),
        ("TITLE", "calstream synthetic field", "Proposal title"),
        ("PI_NAME", "Synthetic, Data", "Principal investigator name"),
        ("CATEGORY", "GO", "Program category"),
        ("DATE-OBS", beg[:10], "[yyyy-mm-dd] UTC date at start of exposure"),
        ("TIME-OBS", beg[11:23], "[hh:mm:ss.sss] UTC time at start of exposure"),
        ("DATE-BEG", beg[:23], "Date-time start of exposure"),
        ("DATE-END", end[:23], "Date-time end of exposure"),
        ("OBS_ID", f"V{prog}{obs}{vis}P{cfg.visit_group:05d}{cfg.seq_id}{cfg.activity:02d}{cfg.exposure:05d}"[:26],
         "Programmatic observation identifier"),
        ("VISIT_ID", f"{prog}{obs}{vis}", "Visit identifier"),
        ("PROGRAM", prog, "Program number"),
        ("OBSERVTN", obs, "Observation number"),
        ("VISIT", vis, "Visit number"),
        ("VISITGRP", f"{cfg.visit_group:02d}", "Visit group identifier"),
        ("SEQ_ID", f"{cfg.seq_id}", "Parallel sequence identifier"),
        ("ACT_ID", f"{cfg.activity:02d}", "Activity identifier"),
        ("EXPOSURE", f"{cfg.exposure}", "Exposure request number"),
        ("BKGDTARG", False, "Background target"),
        ("TEMPLATE", "NIRCam Imaging", "Observation template used"),
        ("OBSLABEL", "synthetic", "Proposer label for the observation"),
        ("VISITYPE", "GENERIC", "Visit type"),
        ("VSTSTART", beg[:23], "UTC visit start time"),
        ("NEXPOSUR", 1, "Total number of planned exposures in visit"),
        ("INTARGET", False, "At least one exposure in visit is internal"),
        ("TARGOOPP", False, "Visit scheduled as target of opportunity"),
        ("TSOVISIT", False, "Time Series Observation visit indicator"),
        ("TARGPROP", "SYNTH-FIELD", "Proposer's name for the target"),
        ("TARGNAME", "SYNTH-FIELD", "Standard astronomical catalog name for target"),
        ("TARGTYPE", "FIXED", "Type of target (fixed, moving, generic)"),
        ("TARG_RA", cfg.target_ra, "Target RA at mid time of exposure"),
        ("TARG_DEC", cfg.target_dec, "Target Dec at mid time of exposure"),
        ("INSTRUME", "NIRCAM", "Instrument used to acquire the data"),
        ("DETECTOR", info.name, "Name of detector used to acquire the data"),
        ("MODULE", info.module, "NIRCam module: A or B"),
        ("CHANNEL", info.channel, "Instrument channel"),
        ("FILTER", filt, "Name of the filter element used"),
        ("PUPIL", cfg.pupil, "Name of the pupil element used"),
        ("PILIN", False, "Pupil imaging lens in the optical path?"),
        ("EXP_TYPE", "NRC_IMAGE", "Type of data in the exposure"),
        ("EXPRIPAR", "PRIME", "Prime or parallel exposure"),
        ("EXPSTART", mjd0, "UTC exposure start time (MJD)"),
        ("EXPMID", 0.5 * (mjd0 + mjd_end), "UTC exposure mid time (MJD)"),
        ("EXPEND", mjd_end, "UTC exposure end time (MJD)"),
        ("READPATT", pat.name, "Readout pattern"),
        ("NINTS", cfg.nints, "Number of integrations in exposure"),
        ("INTSTART", seg[0], "Starting integration number in this segment"),
        ("INTEND", seg[1], "Ending integration number in this segment"),
        ("NGROUPS", cfg.ngroups, "Number of groups in integration"),
        ("NFRAMES", pat.nframes, "Number of frames per group"),
        ("GROUPGAP", pat.groupgap, "Number of frames dropped between groups"),
        ("NSAMPLES", 1, "Number of A/D samples per pixel"),
        ("TSAMPLE", 10.0, "[us] Time between samples"),
        ("TFRAME", timing.tframe, "[s] Time between frames"),
        ("TGROUP", timing.tgroup, "[s] Time between groups"),
        ("EFFINTTM", effint, "[s] Effective integration time"),
        ("EFFEXPTM", effint * cfg.nints, "[s] Effective exposure time"),
        ("DURATION", cfg.nints * timing.t_int, "[s] Total duration of exposure"),
        ("NRSTSTRT", 1, "Number of resets at start of exposure"),
        ("NRESETS", 1, "Number of resets between integrations"),
        ("ZEROFRAM", bool(cfg.zeroframe), "T if a zero frame was read separately"),
        ("DATAPROB", False, "Science telemetry indicated a problem"),
        ("SCA_NUM", info.sca_num, "Sensor Chip Assembly number"),
        ("DATAMODE", 91, "post-processing method used in FPAP"),
        ("FRMDIVSR", pat.nframes, "Divisor applied to frame-averaged groups"),
        ("DRPFRMS1", 0, "Number of frames dropped prior to first integration"),
        ("DRPFRMS3", 0, "Number of frames dropped between integrations"),
        ("EXSEGNUM", segnum, "Segment number"),
        ("EXSEGTOT", nseg, "Total number of segments"),
        *subarray_cards(sub, info, sub.name),
        ("NOUTPUTS", sub.noutputs, "Number of output channels"),
        ("PATTTYPE", "FULL", "Primary dither pattern type"),
        ("PATT_NUM", cfg.exposure, "Position number in primary pattern"),
        ("NUMDTHPT", 1, "Total number of points in pattern"),
        ("XOFFSET", float(cfg.dither[0]) * info.pixel_scale, "x offset from pattern starting position"),
        ("YOFFSET", float(cfg.dither[1]) * info.pixel_scale, "y offset from pattern starting position"),
        ("APERNAME", f"{info.name}_{sub.name}", "PRD science aperture used"),
        ("PPS_APER", f"{info.name}_{sub.name}", "Original AperName supplied by PPS"),
        ("GS_ORDER", 1, "index of guide star within list of selected guide stars"),
        ("PCS_MODE", "FINEGUIDE", "Pointing Control System mode"),
        ("V2_REF", v2, "[arcsec] Telescope v2 coordinate of the reference point"),
        ("V3_REF", v3, "[arcsec] Telescope v3 coordinate of the reference point"),
        ("V3I_YANG", info.v3_yangle, "[deg] Direction angle in V3 (Y)"),
        ("VPARITY", info.vparity, "Relative sense of rotation between Ideal xy and V2V3"),
    ]
    hdr = fits.Header()
    for key, value, comment in cards:
        hdr[key] = (value, comment) if _fits_value_len(value) + len(comment) <= 66 else value
    return hdr


def _fits_value_len(value) -> int:
    """Characters a value takes in a FITS card's value field (>= 20)."""
    if isinstance(value, str):
        return max(20, len(value) + 2)
    if isinstance(value, float):
        return max(20, len(repr(value)))
    return 20


def sci_header(cfg: ExposureConfig, timing: Timing, pointing: Pointing) -> fits.Header:
    """SCI extension header: BUNIT, exposure-time MJDs and the pointing/WCS keywords."""
    info = detector_info(cfg.detector)
    sub = subarray_for(cfg.detector, cfg.subarray)
    mjd0 = timing.mjd_start
    mjd_end = mjd0 + cfg.nints * timing.t_int / 86400.0
    wcs = aperture_wcs(info, sub, pointing)
    hdr = fits.Header()
    cards = {
        "BUNIT": "DN",
        "MJD-BEG": mjd0, "MJD-AVG": 0.5 * (mjd0 + mjd_end), "MJD-END": mjd_end,
        "XPOSURE": (cfg.ngroups - 1) * timing.tgroup * cfg.nints,
        "TELAPSE": cfg.nints * timing.t_int,
        "RADESYS": "ICRS",
        "PA_APER": pa_aper(info, pointing),
        "RA_V1": pointing.ra_v1, "DEC_V1": pointing.dec_v1, "PA_V3": pointing.pa_v3,
        "VA_SCALE": 1.0,
        "V2_REF": pointing.v2_ref, "V3_REF": pointing.v3_ref, "VPARITY": info.vparity,
        "V3I_YANG": info.v3_yangle,
        "RA_REF": pointing.ra_ref, "DEC_REF": pointing.dec_ref, "ROLL_REF": pointing.roll_ref,
        "XREF_SCI": (sub.xsize + 1) / 2.0, "YREF_SCI": (sub.ysize + 1) / 2.0,
        **wcs.header_cards(),
    }
    xs = np.array([0, sub.xsize - 1, sub.xsize - 1, 0], float)
    ys = np.array([0, 0, sub.ysize - 1, sub.ysize - 1], float)
    ra, dec = wcs.pixel_to_world(xs, ys)
    cards["S_REGION"] = "POLYGON ICRS " + " ".join(f"{a:.9f} {d:.9f}" for a, d in zip(ra, dec))
    for key, value in cards.items():
        hdr[key] = value
    return hdr


def group_table(cfg: ExposureConfig, timing: Timing, ints: Sequence[int]) -> np.ndarray:
    """GROUP table rows for the (1-based) integrations ``ints``."""
    sub = subarray_for(cfg.detector, cfg.subarray)
    pat = cfg.pattern
    dtype = [("integration_number", ">i4"), ("group_number", ">i2"), ("end_day", ">i2"),
             ("end_milliseconds", ">i4"), ("end_submilliseconds", ">i2"),
             ("group_end_time", "S26"), ("number_of_columns", ">i2"),
             ("number_of_rows", ">i2"), ("number_of_gaps", ">i2"),
             ("completion_code_number", ">i2"), ("completion_code_text", "S36"),
             ("bary_end_time", ">f8"), ("helio_end_time", ">f8")]
    rows = []
    epoch = Time("2000-01-01T00:00:00", scale="utc").mjd
    for n in ints:
        t_start = timing.mjd_start + ((n - 1) * timing.t_int + timing.tframe) / 86400.0
        for g in range(cfg.ngroups):
            last = g * (pat.nframes + pat.groupgap) + pat.nframes
            mjd = t_start + last * timing.tframe / 86400.0
            days = mjd - epoch
            ms = (days - math.floor(days)) * 86400e3
            rows.append((n, g + 1, int(days), int(ms), int((ms % 1) * 1000),
                         _iso(mjd)[:26], sub.xsize, sub.ysize, 0, 0, "Normal Completion",
                         mjd + 2400000.5, mjd + 2400000.5))
    return np.array(rows, dtype=dtype)


def int_times_table(cfg: ExposureConfig, timing: Timing) -> np.ndarray:
    """INT_TIMES rows for every integration of the exposure (MJD UTC; BJD ~ JD UTC)."""
    dtype = [("integration_number", ">i4"), ("int_start_MJD_UTC", ">f8"),
             ("int_mid_MJD_UTC", ">f8"), ("int_end_MJD_UTC", ">f8"),
             ("int_start_BJD_TDB", ">f8"), ("int_mid_BJD_TDB", ">f8"),
             ("int_end_BJD_TDB", ">f8")]
    rows = []
    for n in range(1, cfg.nints + 1):
        s = timing.mjd_start + (n - 1) * timing.t_int / 86400.0
        e = s + timing.t_int / 86400.0
        m = 0.5 * (s + e)
        off = 2400000.5 + 69.184 / 86400.0
        rows.append((n, s, m, e, s + off, m + off, e + off))
    return np.array(rows, dtype=dtype)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------

def write_uncal(path: str | os.PathLike, data: np.ndarray, primary: fits.Header,
                sci: fits.Header, groups: np.ndarray, int_times: np.ndarray,
                zeroframe: np.ndarray | None = None, via_datamodels: bool = False) -> Path:
    """Write an uncal file (atomically); ``via_datamodels`` adds the ASDF extension."""
    path = Path(path)
    hdus = [fits.PrimaryHDU(header=primary),
            fits.ImageHDU(data=data, header=sci, name="SCI")]
    if zeroframe is not None:
        hdus.append(fits.ImageHDU(data=zeroframe, name="ZEROFRAME"))
    hdus.append(fits.BinTableHDU(data=groups, name="GROUP"))
    hdus.append(fits.BinTableHDU(data=int_times, name="INT_TIMES"))
    hdul = fits.HDUList(hdus)
    tmp = path.with_name(f".tmp{os.getpid()}-{path.name}")   # keeps the .fits extension
    if via_datamodels:
        from stdatamodels.jwst.datamodels import Level1bModel

        with Level1bModel(hdul) as model:
            model.meta.filename = path.name
            model.save(str(tmp))
    else:
        hdul.writeto(tmp, overwrite=True)
    os.replace(tmp, path)
    return path


def generate_exposure(cfg: ExposureConfig, out_dir: str | os.PathLike, *,
                      scene: Scene | None = None, via_datamodels: bool = False) -> ExposureTruth:
    """Simulate and write one exposure (all segments); return its truth record.

    Deterministic in ``cfg`` (seed, exposure number, detector): integration ``n`` uses its
    own random stream, so segmentation does not change the pixels.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inp, scene = prepare_inputs(cfg, scene)
    pat = cfg.pattern
    sub, info, maps = inp.sub, inp.info, inp.maps
    timing = exposure_timing(cfg)
    v2, v3 = subarray_v2v3(info, sub)
    pointing = point_aperture(cfg.target_ra, cfg.target_dec, cfg.pa_v3, v2, v3)
    bounds = segment_bounds(cfg.nints, cfg.nsegments)
    ny, nx = maps.shape
    cr_all = []
    paths = []
    all_times = int_times_table(cfg, timing)
    for segnum, (i0, i1) in enumerate(bounds, start=1):
        nseg_ints = i1 - i0 + 1
        data = np.empty((nseg_ints, cfg.ngroups, ny, nx), dtype=np.uint16)
        zero = np.empty((nseg_ints, ny, nx), dtype=np.uint16) if cfg.zeroframe else None
        for local, n in enumerate(range(i0, i1 + 1)):
            rng = np.random.default_rng([cfg.seed, cfg.exposure, info.index, n, 0xC57])
            crs = draw_cosmic_rays(rng, n, ny, nx, timing.frames_per_int, timing.tframe,
                                   maps.is_ref, cfg.noise)
            cr_all.append(crs)
            simulate_integration(inp, pat, cfg.ngroups, rng, crs, cfg.noise, data[local],
                                 None if zero is None else zero[local])
        segment = segnum if len(bounds) > 1 else None
        name = exposure_basename(cfg, segment)
        prim = primary_header(cfg, timing, (i0, i1), segnum, len(bounds), name)
        sci = sci_header(cfg, timing, pointing)
        groups = group_table(cfg, timing, range(i0, i1 + 1))
        paths.append(write_uncal(out_dir / name, data, prim, sci, groups, all_times, zero,
                                 via_datamodels))
        del data
    light = ~maps.is_ref
    sky_dn = float(np.median((cfg.sky * maps.qe / inp.true_gain)[light]))
    dark_dn = float(np.median(maps.dark_rate[light]))
    crs = np.concatenate(cr_all) if cr_all else np.zeros(0, dtype=CR_DTYPE)
    sources, saturated = _source_truth(scene, inp, timing)
    return ExposureTruth(detector=info.name, subarray=sub, readpatt=pat.name,
                         ngroups=cfg.ngroups, nints=cfg.nints, tframe=timing.tframe,
                         tgroup=timing.tgroup, gain_factor=gain_factor(info.name, cfg.start),
                         sky=cfg.sky, sky_rate_dn=sky_dn, dark_rate_dn=dark_dn,
                         sources=sources, cosmic_rays=crs, saturated_sources=saturated,
                         paths=paths)


def _source_truth(scene: Scene, inp: RampInputs, timing: Timing) -> tuple[list[dict], list[int]]:
    """Sources inside the window (array coordinates) and which saturate in group 1-2."""
    sub, maps = inp.sub, inp.maps
    out, saturated = [], []
    for s in scene.sources:
        x, y = s.x - sub.x0, s.y - sub.y0
        if not (-0.5 <= x < sub.xsize - 0.5 and -0.5 <= y < sub.ysize - 0.5):
            continue
        iy, ix = int(round(y)), int(round(x))
        peak = float(inp.photo_rate[iy, ix])
        well_e = float(maps.well[iy, ix] * inp.true_gain[iy, ix])
        sat_time = well_e / peak if peak > 0 else math.inf
        if sat_time < 2 * timing.tgroup:
            saturated.append(s.id)
        out.append({"id": s.id, "kind": s.kind, "x": x, "y": y, "flux": s.flux,
                    "sigma": s.sigma, "r_eff": s.r_eff, "n": s.n, "q": s.q, "theta": s.theta,
                    "peak_rate": peak, "saturation_time": sat_time})
    return out, saturated


def expected_rate(truth: ExposureTruth, seed: int, scene: Scene,
                  params: DetectorParams | None = None) -> np.ndarray:
    """Noiseless rate [DN/s] a perfect calibration recovers: QE x scene / true gain."""
    sub = truth.subarray
    maps = pixel_maps(truth.detector, seed, sub.y0, sub.x0, sub.ysize, sub.xsize, params)
    rate = render_rate(scene, sub.y0, sub.x0, sub.ysize, sub.xsize)
    return (rate * maps.qe / (maps.gain * np.float32(truth.gain_factor))).astype(np.float32)


__all__ = [
    "CR_DTYPE", "ExposureConfig", "ExposureTruth", "NoiseParams", "RampInputs",
    "accumulate_charge", "draw_cosmic_rays", "expected_rate", "exposure_basename",
    "exposure_timing", "generate_exposure", "group_table", "int_times_table", "pink_noise",
    "linear_at_well", "prepare_inputs", "primary_header", "quantize", "read_frame",
    "row_time", "sci_header",
    "segment_bounds", "simulate_integration", "write_uncal",
]
