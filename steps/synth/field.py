"""A dithered field with sky truth for calwebb_image3: exposures, a level-3 association, truth.

Stars and galaxies are placed on the sky (:class:`~.scene.SkySource`, RA/Dec in degrees, fluxes
in e-/s). Each of ``n_exposures`` dithered exposures renders them through its TRUE WCS — the
distortion-aware gwcs that calwebb_image2's assign_wcs builds (:func:`calstream.steps.image2.
imaging_wcs` with the cache's distortion and filteroffset references) for the TRUE pointing —
while the exposure's header carries the NOMINAL pointing, off by a small deliberate error
(RA/Dec offset of ~``pointing_error_arcsec`` and a roll error) that tweakreg must remove. The
first exposure's header pointing is exact by default (jwst's tweakreg aligns to the first image),
so a relatively aligned mosaic lands on the true sky frame.

Cosmic rays: exposures with NGROUPS <= 2 get no jump detection (jwst skips the step), so every
cosmic ray arriving after their first read survives stage 1; the truth lists those pixels (with
their expected excess rate) for outlier_detection to flag.

Truth (``<product>_truth.json``): sources with RA/Dec, e-/s flux and the calibrated flux density
[Jy] and AB magnitude an ideal calwebb_image2+image3 must measure given the references — the
PSF-weighted response ``QE / (gain x FLAT)`` of the good pixels under each source (photom PHOTMJSR,
nominal PIXAR_SR), averaged over the exposures that contain it —, the true/nominal pointings and
the surviving cosmic rays. A reference catalog of the stars (``<product>_refcat.ecsv``, RA/DEC
columns as tweakreg's ``abs_refcat`` expects) is written beside it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..catalog import AB_ZEROPOINT_JY
from ..dqflags import DO_NOT_USE
from .crds_cache import CrdsCacheInfo, build_crds_cache
from .detector import FULL_SIZE, REF_BORDER, detector_info, frame_time, gain_factor, pixel_maps, subarray_for
from .exposures import (ExposureConfig, ExposureTruth, NoiseParams, exposure_basename, exposure_timing,
                        generate_exposure)
from .scene import Scene, SkySource, Source, aperture_wcs, point_aperture, project, render_rate, subarray_v2v3
from .stage2 import default_filter, photmjsr, pixel_area_sr, stage2_name

#: dither offsets [detector pixels] of successive field exposures (as generate_observation's)
FIELD_DITHERS: tuple[tuple[float, float], ...] = (
    (0.0, 0.0), (13.4, 7.3), (-9.1, 15.8), (6.2, -12.7), (-15.5, -5.9), (21.0, 19.6),
)


@dataclass(frozen=True)
class FieldPointing:
    """Aperture reference pointing of one exposure: RA_REF/DEC_REF/ROLL_REF [deg]."""

    ra_ref: float
    dec_ref: float
    roll_ref: float
    pa_v3: float

    def as_dict(self) -> dict[str, float]:
        return {"ra_ref": self.ra_ref, "dec_ref": self.dec_ref, "roll_ref": self.roll_ref, "pa_v3": self.pa_v3}


@dataclass
class FieldExposure:
    """One exposure of the field: files, pointings, cosmic rays that survive stage 1."""

    exposure: int
    uncal_path: Path
    cal_name: str
    ngroups: int
    nominal: FieldPointing           # in the header
    true: FieldPointing              # used to render the sources
    error_arcsec: tuple[float, float, float]   # (dRA cos(Dec), dDec, dRoll) true - nominal
    start: str = ""                  # UTC exposure start (sets the true gain)
    surviving_crs: list[dict] = field(default_factory=list)
    n_cosmic_ray_pixels: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"exposure": self.exposure, "uncal": str(self.uncal_path), "cal": self.cal_name, "start": self.start,
                "ngroups": self.ngroups, "nominal_pointing": self.nominal.as_dict(),
                "true_pointing": self.true.as_dict(),
                "pointing_error_arcsec": {"dra_cosdec": self.error_arcsec[0], "ddec": self.error_arcsec[1],
                                          "droll": self.error_arcsec[2]},
                "n_cosmic_ray_pixels": self.n_cosmic_ray_pixels, "surviving_crs": self.surviving_crs}


@dataclass
class FieldInfo:
    """Result of :func:`generate_field`."""

    out_dir: Path
    crds_root: Path
    detector: str
    subarray: str
    filter: str
    product_name: str
    uncal_paths: list[Path]
    asn_path: Path
    truth_path: Path
    refcat_path: Path
    sources: list[dict]              # truth rows (see module doc)
    exposures: list[FieldExposure]
    context: str
    true_wcs: list[Any] = field(default_factory=list, repr=False)   # gwcs per exposure

    @property
    def cal_paths(self) -> list[Path]:
        """Where the asn expects the cal products (next to the association file)."""
        return [self.asn_path.parent / e.cal_name for e in self.exposures]


def generate_field(out_dir: str | os.PathLike, crds_root: str | os.PathLike, *, detector: str = "NRCA1",
                   subarray: str = "SUB640", n_exposures: int = 4,
                   ngroups: int | Sequence[int] = (3, 3, 2, 2), readpatt: str = "RAPID", seed: int = 0,
                   cache_seed: int = 0, pointing_error_arcsec: float = 0.15, roll_error_arcsec: float = 5.0,
                   exact_first_pointing: bool = True, stars_per_arcmin2: float = 300.0,
                   galaxies_per_arcmin2: float = 100.0, flux_range: tuple[float, float] | None = None,
                   sky: float = 3.0, target_ra: float = 53.16, target_dec: float = -27.78, pa_v3: float = 45.0,
                   dithers: Sequence[tuple[float, float]] = FIELD_DITHERS,
                   product_name: str = "synth_field", start: str = "2024-03-01T12:00:00.000",
                   via_datamodels: bool = True, noise: NoiseParams | None = None) -> FieldInfo:
    """Write a dithered field's uncal files, its level-3 association and truth into ``out_dir``.

    ``ngroups`` is one value or one per exposure (cycled); the default mixes 3-group exposures with
    2-group ones, whose cosmic rays all survive stage 1 and which still weigh ~10% each in an
    inverse-variance mosaic (so a cosmic ray left in would show). ``seed`` draws the scene and the pointing
    errors; ``cache_seed`` is the synthetic CRDS cache's seed (pixel maps, references, and with the
    exposure number, the noise and cosmic rays). ``flux_range`` [e-/s] defaults to a decade below
    the flux whose central pixel fills half the full well in the longest integration (no saturated
    stars: SUB640 ~2000-19000, FULL ~760-7600 e-/s). The association's members are the
    ``_cal.fits`` names of the exposures (calibrate them into ``out_dir``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    det, sub_name = detector.upper(), subarray.upper()
    groups = [int(ngroups)] * n_exposures if isinstance(ngroups, int) else \
        [int(ngroups[i % len(ngroups)]) for i in range(n_exposures)]
    base = ExposureConfig(detector=det, subarray=sub_name, readpatt=readpatt, ngroups=max(groups), seed=cache_seed,
                          sky=sky, start=start, noise=noise or NoiseParams())
    frames = max(10, max(base.pattern.total_frames(g) for g in groups))
    cache = build_crds_cache(crds_root, detectors=(det,), subarrays=(sub_name,),
                             dark_frames={sub_name: frames}, seed=cache_seed)
    info, sub = detector_info(det), subarray_for(det, sub_name)
    filt = default_filter(det)
    rng = np.random.default_rng([int(seed) % (1 << 32), 0xF1E1D, info.index])
    nominal0 = point_aperture(target_ra, target_dec, pa_v3, *subarray_v2v3(info, sub))
    sources = field_sources(rng, aperture_wcs(info, sub, nominal0), sub, info.pixel_scale,
                            margin=24.0 + max(max(abs(dx), abs(dy)) for dx, dy in dithers[:n_exposures]),
                            stars_per_arcmin2=stars_per_arcmin2, galaxies_per_arcmin2=galaxies_per_arcmin2,
                            flux_range=flux_range or unsaturated_flux_range(base, groups))
    distortion, offset = _wcs_references(cache, det, filt)
    exposures, wcss, truths = [], [], []
    t_next = None
    for n in range(n_exposures):
        cfg = replace(base, exposure=n + 1, ngroups=groups[n], dither=tuple(dithers[n % len(dithers)]))
        if t_next is not None:
            cfg = replace(cfg, start=t_next)
        nominal, true, err = _pointings(cfg, info, sub, rng, pointing_error_arcsec, roll_error_arcsec,
                                        exact=exact_first_pointing and n == 0)
        wcs = true_wcs(true, distortion, offset, sub, info)
        pixels = project(sources, _precomputed(sources, _world_to_pixel(wcs)), sub.x0, sub.y0, info.pixel_scale)
        cfg = replace(cfg, target_ra=nominal.ra_ref, target_dec=nominal.dec_ref, pa_v3=nominal.pa_v3)
        truth = generate_exposure(cfg, out_dir, scene=Scene(sky=sky, sources=pixels), via_datamodels=via_datamodels)
        t_next = _next_start(cfg)
        exposure = FieldExposure(exposure=n + 1, uncal_path=truth.paths[0],
                                 cal_name=exposure_basename(cfg, suffix="cal"), ngroups=groups[n],
                                 nominal=nominal, true=true, error_arcsec=err, start=cfg.start,
                                 n_cosmic_ray_pixels=int(len(truth.cosmic_rays)))
        exposure.surviving_crs = surviving_cosmic_rays(truth, cfg, wcs)
        exposures.append(exposure)
        wcss.append(wcs)
        truths.append((cfg, pixels))
    rows = source_truth(sources, truths, cache, det, filt, cache_seed)
    return _write_products(out_dir, cache, det, sub_name, filt, product_name, exposures, wcss, rows, sky, cache_seed)


# ---------------------------------------------------------------------------------------------
# Scene and pointing
# ---------------------------------------------------------------------------------------------

def field_sources(rng: np.random.Generator, wcs: Any, sub: Any, pixel_scale: float, *, margin: float,
                  stars_per_arcmin2: float, galaxies_per_arcmin2: float,
                  flux_range: tuple[float, float]) -> list[SkySource]:
    """Stars and galaxies at random sky positions inside ``sub`` (less ``margin`` pixels, and the
    reference-pixel border) of the nominal undithered aperture WCS ``wcs`` (TangentPlaneWCS).

    Counts scale with the area; fluxes log-uniform in ``flux_range`` e-/s; galaxies are Sersic
    profiles (r_eff 0.05-0.2 arcsec, n 1 or 4).
    """
    lo_x = max(margin, REF_BORDER - sub.x0 + margin)
    hi_x = min(sub.xsize - margin, FULL_SIZE - REF_BORDER - sub.x0 - margin)
    lo_y = max(margin, REF_BORDER - sub.y0 + margin)
    hi_y = min(sub.ysize - margin, FULL_SIZE - REF_BORDER - sub.y0 - margin)
    area_arcmin2 = (hi_x - lo_x) * (hi_y - lo_y) * (pixel_scale / 60.0) ** 2
    n_stars = max(8, int(round(stars_per_arcmin2 * area_arcmin2)))
    n_gal = max(2, int(round(galaxies_per_arcmin2 * area_arcmin2)))
    x = rng.uniform(lo_x, hi_x, n_stars + n_gal)
    y = rng.uniform(lo_y, hi_y, n_stars + n_gal)
    ra, dec = wcs.pixel_to_world(x, y)
    flux = np.exp(rng.uniform(math.log(flux_range[0]), math.log(flux_range[1]), n_stars + n_gal))
    out = []
    for i in range(n_stars + n_gal):
        if i < n_stars:
            out.append(SkySource("star", float(ra[i]), float(dec[i]), float(flux[i]), id=i + 1))
        else:
            out.append(SkySource("galaxy", float(ra[i]), float(dec[i]), float(flux[i]),
                                 r_eff=float(rng.uniform(0.05, 0.2)), n=float(rng.choice([1.0, 1.0, 4.0])),
                                 q=float(rng.uniform(0.4, 1.0)), pa=float(rng.uniform(0.0, 180.0)), id=i + 1))
    return out


def unsaturated_flux_range(cfg: ExposureConfig, ngroups: Sequence[int], well_fraction: float = 0.5,
                           decades: float = 1.0) -> tuple[float, float]:
    """(min, max) star flux [e-/s]: at max, the central pixel of a centred star (SkySource's FWHM)
    collects ``well_fraction`` of the full well in the longest integration of ``ngroups``."""
    from scipy.special import erf  # noqa: PLC0415

    info, sub = detector_info(cfg.detector), subarray_for(cfg.detector, cfg.subarray)
    p = cfg.detector_params
    gain = p.gain_lw if info.channel == "LONG" else p.gain_sw
    sigma = SkySource("star", 0.0, 0.0, 1.0).fwhm / info.pixel_scale / 2.3548
    peak = erf(0.5 / (sigma * math.sqrt(2.0))) ** 2
    seconds = max(cfg.pattern.total_frames(g) for g in ngroups) * frame_time(sub)
    top = well_fraction * p.well_dn * gain / (peak * seconds)
    return float(top / 10.0 ** decades), float(top)


def _pointings(cfg: ExposureConfig, info: Any, sub: Any, rng: np.random.Generator, error_arcsec: float,
               roll_error_arcsec: float, exact: bool) -> tuple[FieldPointing, FieldPointing, tuple]:
    """Nominal (header) and true pointing of a dithered exposure; the error true - nominal."""
    v2, v3 = subarray_v2v3(info, sub)
    centre = point_aperture(cfg.target_ra, cfg.target_dec, cfg.pa_v3, v2, v3)
    cx, cy = (sub.xsize - 1) / 2.0, (sub.ysize - 1) / 2.0
    ra, dec = aperture_wcs(info, sub, centre).pixel_to_world(np.array([cx - cfg.dither[0]]),
                                                            np.array([cy - cfg.dither[1]]))
    nominal_pt = point_aperture(float(ra[0]), float(dec[0]), cfg.pa_v3, v2, v3)
    if exact:
        err = (0.0, 0.0, 0.0)
    else:
        direction = rng.uniform(0.0, 2.0 * math.pi)
        size = error_arcsec * rng.uniform(0.5, 1.5)
        err = (size * math.cos(direction), size * math.sin(direction),
               roll_error_arcsec * rng.uniform(-1.0, 1.0))
    true_dec = nominal_pt.dec_ref + err[1] / 3600.0
    true_ra = nominal_pt.ra_ref + err[0] / 3600.0 / math.cos(math.radians(true_dec))
    true_pt = point_aperture(true_ra, true_dec, cfg.pa_v3 + err[2] / 3600.0, v2, v3)
    nominal = FieldPointing(nominal_pt.ra_ref, nominal_pt.dec_ref, nominal_pt.roll_ref, nominal_pt.pa_v3)
    true = FieldPointing(true_pt.ra_ref, true_pt.dec_ref, true_pt.roll_ref, true_pt.pa_v3)
    return nominal, true, err


def _next_start(cfg: ExposureConfig) -> str:
    """Start of the next exposure: this one's duration plus 60 s."""
    from astropy.time import Time, TimeDelta  # noqa: PLC0415

    duration = cfg.nints * exposure_timing(cfg).t_int
    return (Time(cfg.start, scale="utc") + TimeDelta(duration + 60.0, format="sec")).isot


# ---------------------------------------------------------------------------------------------
# The true WCS
# ---------------------------------------------------------------------------------------------

def _wcs_references(cache: CrdsCacheInfo, detector: str, filt: str) -> tuple[Any, tuple[float, float] | None]:
    """The distortion model and filter offset image2 reads from the cache's references."""
    from ..image2 import read_distortion, read_filter_offset  # noqa: PLC0415

    distortion = read_distortion(str(cache.references[stage2_name("distortion", detector)]))
    offset = read_filter_offset(str(cache.references[stage2_name("filteroffset", detector)]), filt, "CLEAR")
    return distortion, offset


def true_wcs(pointing: FieldPointing, distortion: Any, offset: tuple[float, float] | None, sub: Any,
             info: Any) -> Any:
    """assign_wcs's gwcs of ``sub`` for ``pointing`` (VA_SCALE 1)."""
    from ..image2 import Pointing, imaging_wcs  # noqa: PLC0415

    v2, v3 = subarray_v2v3(info, sub)
    p = Pointing(pointing.ra_ref, pointing.dec_ref, pointing.roll_ref, v2, v3, 1.0)
    return imaging_wcs(p, distortion, sub.xstart, sub.ystart, sub.xsize, sub.ysize, offset)


def _world_to_pixel(wcs: Any):
    """(ra, dec) -> 0-based (x, y) of the window: the analytic inverse refined by Newton steps on
    the forward transform (what image2's WCS maps pixels with), good to < 1e-6 pixel."""
    def world_to_pixel(ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ra, dec = np.asarray(ra, float), np.asarray(dec, float)
        x, y = wcs.invert(ra, dec, with_bounding_box=False)
        for _ in range(4):
            r0, d0 = wcs(x, y, with_bounding_box=False)
            r1, d1 = wcs(x + 1.0, y, with_bounding_box=False)
            r2, d2 = wcs(x, y + 1.0, with_bounding_box=False)
            cosd = np.cos(np.radians(dec))
            a, b = (r1 - r0) * cosd, (r2 - r0) * cosd
            c, d = d1 - d0, d2 - d0
            er, ed = ((ra - r0 + 180.0) % 360.0 - 180.0) * cosd, dec - d0
            det = a * d - b * c
            x, y = x + (d * er - b * ed) / det, y + (-c * er + a * ed) / det
        return x, y
    return world_to_pixel


def _precomputed(sources: Sequence[SkySource], world_to_pixel):
    """A per-source ``world_to_pixel`` for :func:`.scene.project` answering from one vectorised
    call over all ``sources`` (gwcs calls are costly one by one)."""
    x, y = world_to_pixel(np.array([s.ra for s in sources]), np.array([s.dec for s in sources]))
    table = {(s.ra, s.dec): (float(x[k]), float(y[k])) for k, s in enumerate(sources)}

    def lookup(ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        px, py = table[(float(ra[0]), float(dec[0]))]
        return np.array([px]), np.array([py])
    return lookup


# ---------------------------------------------------------------------------------------------
# Truth
# ---------------------------------------------------------------------------------------------

def surviving_cosmic_rays(truth: ExposureTruth, cfg: ExposureConfig, wcs: Any) -> list[dict]:
    """Cosmic-ray pixels stage 1 cannot remove: all hits after the first read when NGROUPS <= 2.

    Each row: y, x (0-based, array), ra, dec (true sky position), charge [e-], excess [DN/s] the
    hit adds to the rate ((charge / gain) / (time between the two group reads)), snr (excess over
    the read-noise-and-sky noise of a two-group slope).
    """
    if cfg.ngroups > 2 or len(truth.cosmic_rays) == 0:
        return []
    pattern = cfg.pattern
    first_read_end = int(pattern.read_frames(cfg.ngroups)[0, -1])
    crs = truth.cosmic_rays[truth.cosmic_rays["frame"] > first_read_end]
    if len(crs) == 0:
        return []
    sub = truth.subarray
    maps = pixel_maps(truth.detector, cfg.seed, sub.y0, sub.x0, sub.ysize, sub.xsize, cfg.detector_params)
    gain = maps.gain * np.float32(truth.gain_factor)
    ys, xs = crs["y"], crs["x"]
    # charge summed per pixel (several events or a neighbour share may hit the same pixel)
    flat = ys.astype(np.int64) * sub.xsize + xs
    pix, inverse = np.unique(flat, return_inverse=True)
    charge = np.bincount(inverse, weights=crs["charge"].astype(np.float64))
    py, px = pix // sub.xsize, pix % sub.xsize
    dt = truth.tgroup
    excess = charge / gain[py, px] / dt
    sky_dn = truth.sky * maps.qe[py, px] / gain[py, px] * dt
    noise = np.sqrt(maps.readnoise[py, px] ** 2 + np.maximum(sky_dn, 0.0)) / dt
    ra, dec = wcs(px.astype(float), py.astype(float), with_bounding_box=False)
    dnu = (maps.mask_dq[py, px] & DO_NOT_USE) != 0
    return [{"y": int(py[i]), "x": int(px[i]), "ra": float(ra[i]), "dec": float(dec[i]),
             "charge": float(charge[i]), "excess_dn_s": float(excess[i]), "snr": float(excess[i] / noise[i]),
             "do_not_use": bool(dnu[i])} for i in range(len(pix))]


def source_truth(sources: Sequence[SkySource], exposures: Sequence[tuple[ExposureConfig, list[Source]]],
                 cache: CrdsCacheInfo, detector: str, filt: str, cache_seed: int) -> list[dict]:
    """Truth rows of ``sources``: e-/s flux, expected DN/s, Jy and AB mag (see the module doc)."""
    from astropy.io import fits  # noqa: PLC0415

    from ..image2 import prepare_flat  # noqa: PLC0415

    flat_path = cache.references[stage2_name("flat", detector, filt)]
    conversion = photmjsr(detector, filt) * 1e6 * pixel_area_sr(detector)     # Jy per DN/s
    per_exposure: list[list[float | None]] = []
    for cfg, pixels in exposures:
        sub = subarray_for(cfg.detector, cfg.subarray)
        maps = pixel_maps(cfg.detector, cache_seed, sub.y0, sub.x0, sub.ysize, sub.xsize, cfg.detector_params)
        with fits.open(flat_path) as hdul:
            window = (slice(sub.y0, sub.y0 + sub.ysize), slice(sub.x0, sub.x0 + sub.xsize))
            flat, flat_dq = prepare_flat(hdul["SCI"].data[window], hdul["DQ"].data[window])
        response = maps.qe / (maps.gain * np.float32(gain_factor(cfg.detector, cfg.start)) * flat)
        good = ((maps.mask_dq | flat_dq) & DO_NOT_USE) == 0
        good &= ~maps.is_ref & (maps.qe > 0)
        per_exposure.append([_expected_dn_s(src, sub, response, good) for src in pixels])
    rows = []
    for k, src in enumerate(sources):
        values = [per_exposure[e][k] for e in range(len(exposures))]
        inside = [v for v in values if v is not None]
        mean_dn = float(np.mean(inside)) if inside else None
        jy = None if mean_dn is None else mean_dn * conversion
        rows.append({"id": src.id, "kind": src.kind, "ra": src.ra, "dec": src.dec, "flux_e_s": src.flux,
                     "fwhm_arcsec": src.fwhm, "r_eff_arcsec": src.r_eff, "sersic_n": src.n, "q": src.q,
                     "pa_deg": src.pa, "expected_dn_s": values, "n_exposures": len(inside),
                     "in_all_exposures": len(inside) == len(exposures),
                     "expected_jy": jy, "expected_abmag": None if not jy else -2.5 * math.log10(jy / AB_ZEROPOINT_JY)})
    _mark_isolated(rows, sources)
    return rows


def _expected_dn_s(src: Source, sub: Any, response: np.ndarray, good: np.ndarray) -> float | None:
    """Calibrated DN/s (before PHOTMJSR) an ideal pipeline measures for one source on one exposure,
    or None when part of its light falls off the light-sensitive window."""
    rad = 8.0 * src.sigma if src.kind == "star" else (5.0 if src.n < 2 else 7.0) * max(src.r_eff, 0.5)
    y0, x0 = int(math.floor(src.y - rad)), int(math.floor(src.x - rad))
    y1, x1 = int(math.ceil(src.y + rad)) + 1, int(math.ceil(src.x + rad)) + 1
    lo_y, lo_x = max(sub.y0, REF_BORDER), max(sub.x0, REF_BORDER)
    hi_y = min(sub.y0 + sub.ysize, FULL_SIZE - REF_BORDER)
    hi_x = min(sub.x0 + sub.xsize, FULL_SIZE - REF_BORDER)
    if y0 < lo_y or x0 < lo_x or y1 > hi_y or x1 > hi_x:
        return None
    stamp = render_rate(Scene(sky=0.0, sources=[replace(src, flux=1.0)]), y0, x0, y1 - y0, x1 - x0).astype(np.float64)
    win = (slice(y0 - sub.y0, y1 - sub.y0), slice(x0 - sub.x0, x1 - sub.x0))
    ok = good[win]
    weight = stamp[ok].sum()
    if weight <= 0:
        return None
    mean_response = float((stamp[ok] * response[win][ok]).sum() / weight)
    return src.flux * float(stamp.sum()) * mean_response


def _mark_isolated(rows: list[dict], sources: Sequence[SkySource]) -> None:
    """``isolated``: no other source within 0.8 arcsec plus 7 of its half-light radii."""
    ra = np.array([s.ra for s in sources])
    dec = np.array([s.dec for s in sources])
    reach = 0.8 + 7.0 * np.array([s.r_eff for s in sources])
    cosd = math.cos(math.radians(float(np.mean(dec))))
    for k, row in enumerate(rows):
        d = np.hypot((ra - ra[k]) * cosd, dec - dec[k]) * 3600.0
        d[k] = np.inf
        row["isolated"] = bool(np.all(d > np.maximum(reach, reach[k])))


# ---------------------------------------------------------------------------------------------
# Products
# ---------------------------------------------------------------------------------------------

def _write_products(out_dir: Path, cache: CrdsCacheInfo, det: str, sub_name: str, filt: str, product_name: str,
                    exposures: list[FieldExposure], wcss: list[Any], rows: list[dict], sky: float,
                    cache_seed: int) -> FieldInfo:
    from astropy.table import Table  # noqa: PLC0415

    from ..asn import asn_from_list, write_association  # noqa: PLC0415
    from ..fitsio import atomic_output  # noqa: PLC0415

    asn_path = write_association(asn_from_list([e.cal_name for e in exposures], product_name),
                                 out_dir / f"{product_name}_asn.json")
    stars = [r for r in rows if r["kind"] == "star"]
    refcat = Table({"RA": [r["ra"] for r in stars], "DEC": [r["dec"] for r in stars],
                    "id": [r["id"] for r in stars]}, meta={"name": f"{product_name} true star positions"})
    refcat_path = out_dir / f"{product_name}_refcat.ecsv"
    with atomic_output(refcat_path) as tmp:
        refcat.write(tmp, format="ascii.ecsv", overwrite=True)
    truth = {"product_name": product_name, "asn": asn_path.name, "refcat": refcat_path.name, "detector": det,
             "subarray": sub_name, "filter": filt, "pupil": "CLEAR", "photmjsr": photmjsr(det, filt),
             "pixar_sr": pixel_area_sr(det), "pixel_scale_arcsec": detector_info(det).pixel_scale,
             "sky_e_s": sky, "crds_context": cache.operational_context, "cache_seed": cache_seed,
             "exposures": [e.to_dict() for e in exposures], "sources": rows}
    truth_path = out_dir / f"{product_name}_truth.json"
    with atomic_output(truth_path) as tmp, open(tmp, "w") as stream:
        json.dump(truth, stream, indent=1)
    return FieldInfo(out_dir=out_dir, crds_root=cache.root, detector=det, subarray=sub_name, filter=filt,
                     product_name=product_name, uncal_paths=[e.uncal_path for e in exposures], asn_path=asn_path,
                     truth_path=truth_path, refcat_path=refcat_path, sources=rows, exposures=exposures,
                     context=cache.operational_context, true_wcs=wcss)


__all__ = ["FIELD_DITHERS", "FieldExposure", "FieldInfo", "FieldPointing", "field_sources", "generate_field",
           "source_truth", "surviving_cosmic_rays", "true_wcs", "unsaturated_flux_range"]
