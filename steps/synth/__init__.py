"""Synthetic JWST/NIRCam data: uncal exposures, reference files and a local CRDS cache.

No archive or CRDS server is reachable, so calstream generates its own realistic inputs:

* :mod:`.detector` – NIRCam geometry, subarrays, readout patterns, per-pixel truth maps;
* :mod:`.scene` – sky, stars and galaxies, pointing and a simple WCS;
* :mod:`.references` – MASK/SATURATION/SUPERBIAS/LINEARITY/DARK/GAIN/READNOISE FITS and
  ``pars-*`` ASDF references in the JWST formats;
* :mod:`.crds_cache` – serverless CRDS cache with real pmaps/imaps/rmaps (two contexts);
* :mod:`.exposures` – ramp simulation and uncal writing.

Entry point: :func:`generate_observation`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from .crds_cache import CrdsCacheInfo, build_crds_cache
from .detector import (DetectorParams, detector_info, read_pattern, subarray_for)
from .exposures import ExposureConfig, ExposureTruth, NoiseParams, generate_exposure
from .stage2 import check_filter
from .scene import aperture_wcs, point_aperture, subarray_v2v3

#: Small dither pattern (detector pixels) applied to successive exposures.
DITHERS: tuple[tuple[float, float], ...] = (
    (0.0, 0.0), (13.4, 7.3), (-9.1, 15.8), (6.2, -12.7), (-15.5, -5.9), (21.0, 19.6),
)


@dataclass
class ObservationInfo:
    """Result of :func:`generate_observation`."""

    out_dir: Path
    crds_root: Path
    contexts: list[str]
    operational_context: str
    exposures: list[ExposureTruth] = field(default_factory=list)
    cache: CrdsCacheInfo | None = None
    seed: int = 0

    @property
    def uncal_paths(self) -> list[Path]:
        """Every uncal file written (all exposures, detectors and segments)."""
        return [p for e in self.exposures for p in e.paths]

    def crds_env(self, context: str | None = None) -> dict[str, str]:
        """Environment for running jwst/crds offline against this cache."""
        env = {"CRDS_PATH": str(self.crds_root),
               "CRDS_SERVER_URL": "https://crds-serverless-mode.stsci.edu",
               "CRDS_CONTEXT": context or self.operational_context}
        return env

    def to_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), "crds_root": str(self.crds_root),
                "contexts": self.contexts, "operational_context": self.operational_context,
                "seed": self.seed, "exposures": [e.to_dict() for e in self.exposures]}


def generate_observation(out_dir: str | os.PathLike, crds_root: str | os.PathLike, *,
                         detectors: Sequence[str] = ("NRCA1",), subarray: str = "SUB160",
                         readpatt: str = "RAPID", ngroups: int = 10, nints: int = 1,
                         n_exposures: int = 1, nsegments: int = 1, seed: int = 0,
                         full_frame_references: bool = False,
                         start: str = "2024-03-01T12:00:00.000", sky: float = 3.0,
                         target_ra: float = 53.16, target_dec: float = -27.78,
                         pa_v3: float = 45.0, zeroframe: bool = False,
                         via_datamodels: bool = True, noise: NoiseParams | None = None,
                         program: int = 1234, observation: int = 1, visit: int = 1,
                         write_truth: bool = True, filter: str | None = None,
                         reprocessing_contexts: bool = False) -> ObservationInfo:
    """Build/extend the CRDS cache at ``crds_root`` and write uncal exposures to ``out_dir``.

    ``n_exposures`` dithered exposures (exposure numbers 1..n, consecutive in time) are
    written for each detector, each split into ``nsegments`` segments.  References are
    generated once per (detector, subarray) and reused; darks get enough frames for the
    readout (at least 10).  ``full_frame_references`` writes 2048x2048 references (the
    pipeline extracts the subarray) instead of subarray-sized ones; darks are always
    per subarray.  Exposure dates default to after the NRCA1 gain change, so contexts
    jwst_0001 and jwst_0002 select different gain files for NRCA1.

    ``via_datamodels`` (default True) writes through stdatamodels' Level1bModel, adding the
    ASDF extension MAST files carry — jwst 3.0's ``Detector1Pipeline.call(<path>)`` needs
    it (``read_metadata`` looks for the ASDF HDU); False writes plain FITS (faster).
    Writes ``synth_truth.json`` in ``out_dir`` when ``write_truth``.  ``filter`` (default:
    F200W on SHORT, F444W on LONG detectors) also gets its stage-2 references;
    ``reprocessing_contexts`` adds contexts jwst_0003/0004 (see :func:`build_crds_cache`).
    """
    pattern = read_pattern(readpatt)
    sub_name = subarray.upper()
    dets = tuple(d.upper() for d in detectors)
    for det in dets:
        subarray_for(det, sub_name)
        if filter:
            check_filter(det, filter)
    frames = max(10, pattern.total_frames(ngroups))
    cache = build_crds_cache(crds_root, detectors=dets, subarrays=(sub_name,),
                             full_frame_references=full_frame_references,
                             dark_frames={sub_name: frames}, seed=seed,
                             filters=(filter,) if filter else (),
                             reprocessing_contexts=reprocessing_contexts)
    # the manifest may already hold a longer dark; never shrink
    info = ObservationInfo(out_dir=Path(out_dir), crds_root=Path(crds_root),
                           contexts=cache.contexts,
                           operational_context=cache.operational_context, cache=cache,
                           seed=seed)
    base = ExposureConfig(subarray=sub_name, readpatt=pattern.name, ngroups=ngroups,
                          nints=nints, nsegments=nsegments, seed=seed, sky=sky,
                          target_ra=target_ra, target_dec=target_dec, pa_v3=pa_v3,
                          zeroframe=zeroframe, program=program, observation=observation,
                          visit=visit, noise=noise or NoiseParams(), start=start,
                          filter=filter.upper() if filter else None)
    from astropy.time import Time, TimeDelta

    t0 = Time(start, scale="utc")
    for n in range(n_exposures):
        dither = DITHERS[n % len(DITHERS)]
        for det in dets:
            cfg = replace(base, detector=det, exposure=n + 1, dither=dither)
            timing_s = _exposure_duration(cfg)
            cfg = replace(cfg, start=(t0 + TimeDelta(n * (timing_s + 60.0), format="sec")).isot)
            cfg = _dithered_pointing(cfg)
            info.exposures.append(generate_exposure(cfg, out_dir, via_datamodels=via_datamodels))
    if write_truth:
        path = Path(out_dir) / "synth_truth.json"
        path.write_text(json.dumps(info.to_dict(), indent=1, default=_json_default))
    return info


def _json_default(obj):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(type(obj))


def _exposure_duration(cfg: ExposureConfig) -> float:
    from .exposures import exposure_timing

    return cfg.nints * exposure_timing(cfg).t_int


def _dithered_pointing(cfg: ExposureConfig) -> ExposureConfig:
    """Move the aperture reference on the sky so the field shifts by ``cfg.dither`` px."""
    if cfg.dither == (0.0, 0.0):
        return cfg
    info = detector_info(cfg.detector)
    sub = subarray_for(cfg.detector, cfg.subarray)
    point = point_aperture(cfg.target_ra, cfg.target_dec, cfg.pa_v3, *subarray_v2v3(info, sub))
    wcs = aperture_wcs(info, sub, point)
    cx, cy = (sub.xsize - 1) / 2.0, (sub.ysize - 1) / 2.0
    ra, dec = wcs.pixel_to_world(np.array([cx - cfg.dither[0]]), np.array([cy - cfg.dither[1]]))
    return replace(cfg, target_ra=float(ra[0]), target_dec=float(dec[0]))


__all__ = [
    "DITHERS", "DetectorParams", "ExposureConfig", "ExposureTruth", "NoiseParams",
    "ObservationInfo", "build_crds_cache", "generate_exposure", "generate_observation",
]
