"""Synthetic stage-2 (calwebb_image2) NIRCam references in jwst's formats.

* ``distortion`` – ASDF DistortionModel: full-frame detector pixel (0-based) -> V2, V3 [arcsec];
  a cubic polynomial ideal-plane distortion (<= ~0.5 px at the corners) then the linear
  ideal -> V2V3 rotation of :func:`..scene.subarray_v2v3` (VPARITY, V3I_YANG), with an inverse.
* ``filteroffset`` – ASDF FilteroffsetModel: a small (column, row) shift per filter/pupil.
* ``flat`` – FlatModel SCI/ERR/DQ (2048 x 2048, per detector + filter + pupil): the synthetic
  detector's pixel response with a lamp flat's measurement noise; a few NaN, zero and
  NO_FLAT_FIELD pixels.
* ``photom`` – NircamPhotomModel table: PHOTMJSR per filter/pupil (one file per detector).
* ``area`` – PixelAreaModel (2048 x 2048) with PIXAR_SR / PIXAR_A2.

Files are written through stdatamodels so jwst opens them exactly as it opens real ones.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from .detector import DETECTORS, FULL_SIZE, DetectorParams, detector_info, pixel_maps

#: filters given photom rows (SHORT and LONG channel broad bands), all with PUPIL=CLEAR
PHOTOM_FILTERS: dict[str, float] = {
    "F070W": 0.52, "F090W": 0.41, "F115W": 0.33, "F150W": 0.27, "F200W": 0.21,
    "F277W": 0.24, "F356W": 0.18, "F444W": 0.16,
}
#: (column, row) filter offsets [pixels] recorded in the filteroffset reference
FILTER_OFFSETS: dict[str, tuple[float, float]] = {"F200W": (0.31, -0.22), "F444W": (-0.17, 0.12)}
#: radial distortion: ideal = s * d * (1 + K * |d|^2) (d in pixels from the detector centre)
DISTORTION_K = 1.5e-7 / 1024.0   # ~0.4 px at the corners
STAGE2_USEAFTER = "2022-01-01T00:00:00"
NO_FLAT_FIELD, DO_NOT_USE = 1 << 18, 1


def stage2_name(reftype: str, detector: str, filt: str | None = None, version: int = 1) -> str:
    """CRDS-style basename, e.g. ``jwst_nircam_flat_0105.fits`` (detector 1, filter 5);
    a later ``version`` of a per-filter file adds 5000 per version (``..._flat_5105.fits``)."""
    det = DETECTORS.index(detector.upper()) + 1
    code = det if filt is None else 100 * det + list(PHOTOM_FILTERS).index(filt.upper()) + 1
    ext = ".asdf" if reftype in ("distortion", "filteroffset") else ".fits"
    number = 9000 + code if filt is None else code + 5000 * (version - 1)
    return f"jwst_nircam_{reftype}_{number:04d}{ext}"


def _meta(model, reftype: str, detector: str, descr: str) -> None:
    info = detector_info(detector)
    m = model.meta
    m.telescope = "JWST"
    m.instrument.name = "NIRCAM"
    m.instrument.detector = info.name
    m.instrument.module = info.module
    m.instrument.channel = info.channel
    m.reftype = reftype.upper()
    m.author = "calstream synth"
    m.pedigree = "DUMMY"
    m.description = descr
    m.useafter = STAGE2_USEAFTER
    m.exposure.type = "NRC_IMAGE"
    model.add_history_entry(f"calstream synthetic {reftype} reference")   # crds certify needs HISTORY


def distortion_model(detector: str):
    """The astropy model full-frame pixel (x, y) -> (V2, V3) arcsec, with a fitted inverse."""
    from astropy.modeling import fitting, models  # noqa: PLC0415

    info = detector_info(detector)
    c = (FULL_SIZE - 1) / 2.0
    s, k = info.pixel_scale, DISTORTION_K
    # xi = s (dx + k dx^3 + k dx dy^2), eta = s (dy + k dy^3 + k dx^2 dy)
    px = models.Polynomial2D(3, c1_0=s, c3_0=s * k, c1_2=s * k)
    py = models.Polynomial2D(3, c0_1=s, c0_3=s * k, c2_1=s * k)
    ang = math.radians(info.v3_yangle)
    p = info.vparity
    matrix = np.array([[p * math.cos(ang), math.sin(ang)], [-p * math.sin(ang), math.cos(ang)]])
    rot = models.AffineTransformation2D(matrix=matrix, translation=[info.v2_ref, info.v3_ref])
    forward = (models.Shift(-c) & models.Shift(-c)) | models.Mapping((0, 1, 0, 1)) | (px & py) | rot
    # inverse: V2V3 -> ideal (exact affine inverse), ideal -> pixel offsets (fitted polynomial)
    grid = np.linspace(-0.05 * FULL_SIZE, 1.05 * FULL_SIZE, 41)
    gx, gy = np.meshgrid(grid, grid)
    xi, eta = px(gx - c, gy - c), py(gx - c, gy - c)
    fit = fitting.LinearLSQFitter()
    ix = fit(models.Polynomial2D(5), xi, eta, gx - c)
    iy = fit(models.Polynomial2D(5), xi, eta, gy - c)
    inv_rot = rot.inverse
    backward = inv_rot | models.Mapping((0, 1, 0, 1)) | (ix & iy) | (models.Shift(c) & models.Shift(c))
    forward.inverse = backward
    return forward


def write_distortion(path: str | os.PathLike, detector: str) -> None:
    from stdatamodels.jwst.datamodels import DistortionModel  # noqa: PLC0415

    with DistortionModel() as model:
        model.model = distortion_model(detector)
        _meta(model, "distortion", detector, "calstream synthetic cubic distortion")
        model.meta.instrument.pupil = "CLEAR"
        model.meta.instrument.p_pupil = "CLEAR|"
        model.meta.input_units = "pixel"
        model.meta.output_units = "arcsec"
        model.save(str(path))


def write_filteroffset(path: str | os.PathLike, detector: str) -> None:
    from stdatamodels.jwst.datamodels import FilteroffsetModel  # noqa: PLC0415

    with FilteroffsetModel() as model:
        _meta(model, "filteroffset", detector, "calstream synthetic filter offsets")
        model.filters = [{"filter": f, "pupil": "CLEAR", "column_offset": c, "row_offset": r}
                         for f, (c, r) in FILTER_OFFSETS.items()]
        model.save(str(path))


#: rms of the flat's per-pixel measurement error (real NIRCam imaging flats: a few 0.1%)
FLAT_NOISE = 0.003


def flat_arrays(detector: str, filt: str, seed: int = 0, version: int = 1, params: DetectorParams | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full-frame (2048, 2048) flat SCI, ERR float32 and DQ uint32 of ``detector``: the relative
    response (QE / gain, DN per photon, median 1) of the synthetic detector of ``seed`` and ``params``
    (:func:`.detector.pixel_maps`), as a lamp flat measures it (``FLAT_NOISE`` rms per pixel;
    ``version`` draws a new measurement), plus a few NaN / zero / NO_FLAT_FIELD / DO_NOT_USE
    pixels. Dead pixels measure 0; reference pixels are 1."""
    response, is_ref = detector_response(detector, seed, params or DetectorParams())
    rng = np.random.default_rng([seed, DETECTORS.index(detector.upper()), list(PHOTOM_FILTERS).index(filt), version])
    sci = (response * (1.0 + rng.normal(0.0, FLAT_NOISE, response.shape))).astype(np.float32)
    sci[is_ref] = 1.0
    err = (FLAT_NOISE * np.abs(sci)).astype(np.float32)
    dq = np.zeros(sci.shape, np.uint32)
    n = FULL_SIZE * FULL_SIZE
    for frac, kind in ((2e-4, "nan"), (1e-4, "zero"), (2e-4, "noflat"), (1e-4, "dnu")):
        idx = rng.choice(n, int(frac * n), replace=False)
        if kind == "nan":
            sci.flat[idx] = np.nan
        elif kind == "zero":
            sci.flat[idx] = 0.0
        elif kind == "noflat":
            dq.flat[idx] |= NO_FLAT_FIELD
        else:
            dq.flat[idx] |= DO_NOT_USE
    return sci, err, dq


@functools.lru_cache(maxsize=1)
def detector_response(detector: str, seed: int, params: DetectorParams) -> tuple[np.ndarray, np.ndarray]:
    """(float32 (2048, 2048) relative response QE / gain of the light-sensitive pixels, median 1;
    bool reference-pixel mask) of the synthetic detector; kept for the next filter's flat."""
    maps = pixel_maps(detector, seed, params=params)
    response = maps.qe / maps.gain
    response /= np.median(response[~maps.is_ref & (maps.qe > 0)])
    response.flags.writeable = False
    maps.is_ref.flags.writeable = False
    return response, maps.is_ref


def write_flat(path: str | os.PathLike, detector: str, filt: str, seed: int = 0, version: int = 1,
               params: DetectorParams | None = None) -> None:
    from stdatamodels.jwst.datamodels import FlatModel  # noqa: PLC0415

    sci, err, dq = flat_arrays(detector, filt, seed, version, params)
    with FlatModel(data=sci, err=err, dq=dq) as model:
        _meta(model, "flat", detector, f"calstream synthetic flat {filt}" + (f" (version {version})" if version > 1 else ""))
        model.meta.instrument.filter = filt
        model.meta.instrument.pupil = "CLEAR"
        model.meta.subarray.name = "FULL"
        model.meta.subarray.xstart, model.meta.subarray.ystart = 1, 1
        model.meta.subarray.xsize = model.meta.subarray.ysize = FULL_SIZE
        model.save(str(path))


def photmjsr(detector: str, filt: str) -> float:
    """The PHOTMJSR value written for ``detector`` / ``filt`` [(MJy/sr) / (DN/s)]."""
    return PHOTOM_FILTERS[filt] * (1.0 + 0.01 * DETECTORS.index(detector.upper()))


def write_photom(path: str | os.PathLike, detector: str) -> None:
    from stdatamodels.jwst.datamodels import NrcImgPhotomModel  # noqa: PLC0415

    rows = [(f, "CLEAR", 0, np.float32(photmjsr(detector, f)), np.float32(0.01 * photmjsr(detector, f)))
            for f in PHOTOM_FILTERS]
    table = np.array(rows, dtype=[("filter", "S12"), ("pupil", "S12"), ("order", "<i2"),
                                  ("photmjsr", "<f4"), ("uncertainty", "<f4")])
    with NrcImgPhotomModel(phot_table=table) as model:
        _meta(model, "photom", detector, "calstream synthetic photom")
        model.meta.photometry.pixelarea_steradians = pixel_area_sr(detector)
        model.meta.photometry.pixelarea_arcsecsq = detector_info(detector).pixel_scale ** 2
        model.save(str(path))


def pixel_area_sr(detector: str) -> float:
    return (detector_info(detector).pixel_scale / 206264.80624709636) ** 2


def write_area(path: str | os.PathLike, detector: str, filt: str) -> None:
    from stdatamodels.jwst.datamodels import PixelAreaModel  # noqa: PLC0415

    y, x = np.mgrid[0:FULL_SIZE, 0:FULL_SIZE].astype(np.float32)
    r2 = ((x - 1023.5) ** 2 + (y - 1023.5) ** 2) / 1024.0 ** 2
    area = (1.0 + 0.003 * r2).astype(np.float32)
    with PixelAreaModel(data=area) as model:
        _meta(model, "area", detector, "calstream synthetic pixel area")
        model.meta.instrument.filter = filt
        model.meta.instrument.pupil = "CLEAR"
        model.meta.photometry.pixelarea_steradians = pixel_area_sr(detector)
        model.meta.photometry.pixelarea_arcsecsq = detector_info(detector).pixel_scale ** 2
        model.save(str(path))


def default_filter(detector: str) -> str:
    return "F200W" if detector_info(detector).channel == "SHORT" else "F444W"


def check_filter(detector: str, filt: str) -> str:
    """``filt`` (upper case) if the synthetic references know it and it belongs to ``detector``'s
    channel; ValueError naming both otherwise."""
    name = str(filt).upper()
    if name not in PHOTOM_FILTERS:
        raise ValueError(f"filter {filt!r} is not one the synthetic references know ({', '.join(PHOTOM_FILTERS)})")
    channel = detector_info(detector).channel
    if (int(name[1:4]) < 250) != (channel == "SHORT"):
        raise ValueError(f"filter {name} is not in the {channel} channel of {detector.upper()}")
    return name


def detector_filters(detector: str, filters: Iterable[str] = ()) -> list[str]:
    """The default filter of ``detector`` plus those of ``filters`` in its channel
    (SHORT: below 2.5 um, LONG: above)."""
    channel = detector_info(detector).channel
    out = [default_filter(detector)]
    for filt in (f.upper() for f in filters):
        short = int(filt[1:4]) < 250
        if filt not in out and short == (channel == "SHORT"):
            out.append(filt)
    return out


def write_stage2_references(refdir: str | os.PathLike, detectors: Iterable[str], seed: int = 0,
                            force: bool = False, filters: Iterable[str] = (), params: DetectorParams | None = None
                            ) -> list[tuple[str, tuple[str, ...], str]]:
    """Write (when missing) the stage-2 references of ``detectors`` (their default filter and
    the ``filters`` of their channel, PUPIL=CLEAR); return ``(reftype, match, basename)`` rows
    for the rmaps.

    Match tuples follow :data:`STAGE2_PARKEYS`.
    """
    refdir = Path(refdir)
    rows: list[tuple[str, tuple[str, ...], str]] = []
    filters = tuple(filters)
    for det in detectors:
        det = det.upper()
        jobs = [("distortion", (det, "NRC_IMAGE", "CLEAR"), stage2_name("distortion", det),
                 lambda p, d=det: write_distortion(p, d)),
                ("filteroffset", (det, "NRC_IMAGE"), stage2_name("filteroffset", det),
                 lambda p, d=det: write_filteroffset(p, d)),
                ("photom", (det, "NRC_IMAGE"), stage2_name("photom", det),
                 lambda p, d=det: write_photom(p, d))]
        for filt in detector_filters(det, filters):
            jobs += [("flat", (det, filt, "CLEAR", "NRC_IMAGE"), stage2_name("flat", det, filt),
                      lambda p, d=det, f=filt: write_flat(p, d, f, seed, params=params)),
                     ("area", (det, filt, "CLEAR", "NRC_IMAGE"), stage2_name("area", det, filt),
                      lambda p, d=det, f=filt: write_area(p, d, f))]
        for reftype, match, name, writer in jobs:
            path = refdir / name
            if force or not path.exists():
                tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
                writer(tmp)
                os.replace(tmp, path)
            rows.append((reftype, match, name))
    return rows


DET, FILT, PUP, EXP = ("META.INSTRUMENT.DETECTOR", "META.INSTRUMENT.FILTER",
                       "META.INSTRUMENT.PUPIL", "META.EXPOSURE.TYPE")
#: rmap Match parkeys of the stage-2 types (as real NIRCam rmaps: detector, filter, pupil, exp_type)
STAGE2_PARKEYS: dict[str, tuple[str, ...]] = {
    "distortion": (DET, EXP, PUP), "filteroffset": (DET, EXP), "photom": (DET, EXP),
    "flat": (DET, FILT, PUP, EXP), "area": (DET, FILT, PUP, EXP),
}
#: further types Image2Pipeline asks CRDS for on NIRCam imaging, N/A in the synthetic cache
IMAGE2_NA_TYPES: tuple[str, ...] = (
    "specwcs", "regions", "wavelengthrange", "camera", "chromcorr", "collimator", "disperser",
    "fore", "fpa", "msa", "ote", "ifupost", "ifufore", "ifuslicer", "fflat", "sflat", "dflat",
    "bkg", "drizpars", "pars-image2pipeline", "pars-backgroundstep", "pars-assignwcsstep",
    "pars-flatfieldstep", "pars-photomstep", "pars-resamplestep",
)


def write_synthetic_rate(out_dir: str | os.PathLike, *, detector: str = "NRCA1", subarray: str = "SUB160",
                         seed: int = 0, va_scale: float | None = None, target_ra: float = 53.16,
                         target_dec: float = -27.78, pa_v3: float = 45.0) -> Path:
    """A rate product (DN/s) with the headers and pointing of a synthetic exposure, without
    simulating its ramps: sky ~3 DN/s + noise, variances, and a few DO_NOT_USE/NaN pixels.

    ``va_scale`` overrides the SCI header's VA_SCALE (velocity-aberration scale, default 1)."""
    from ..products import Provenance, carried_sci_cards, write_rate  # noqa: PLC0415
    from .detector import subarray_for  # noqa: PLC0415
    from .exposures import (ExposureConfig, exposure_basename, exposure_timing,  # noqa: PLC0415
                            primary_header, sci_header)
    from .scene import point_aperture, subarray_v2v3  # noqa: PLC0415

    cfg = ExposureConfig(detector=detector.upper(), subarray=subarray.upper(), seed=seed, target_ra=target_ra,
                         target_dec=target_dec, pa_v3=pa_v3)
    timing = exposure_timing(cfg)
    info, sub = detector_info(cfg.detector), subarray_for(cfg.detector, cfg.subarray)
    pointing = point_aperture(target_ra, target_dec, pa_v3, *subarray_v2v3(info, sub))
    name = exposure_basename(cfg, suffix="rate")
    primary = primary_header(cfg, timing, (1, cfg.nints), 1, 1, name)
    sci_cards = carried_sci_cards(sci_header(cfg, timing, pointing))
    if va_scale is not None:
        sci_cards["VA_SCALE"] = float(va_scale)
    rng = np.random.default_rng([seed, DETECTORS.index(cfg.detector), sub.ysize, sub.xsize])
    shape = (sub.ysize, sub.xsize)
    sci = rng.normal(3.0, 1.0, shape).astype(np.float32)
    var_p = rng.uniform(0.01, 0.2, shape).astype(np.float32)
    var_r = rng.uniform(0.01, 0.1, shape).astype(np.float32)
    dq = np.zeros(shape, np.uint32)
    bad = rng.choice(sci.size, max(1, sci.size // 5000), replace=False)
    dq.flat[bad] |= np.uint32(DO_NOT_USE | 2)              # DO_NOT_USE + SATURATED
    sci.flat[bad] = var_p.flat[bad] = var_r.flat[bad] = np.nan
    err = np.sqrt(var_p + var_r).astype(np.float32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    write_rate(path, primary, Provenance("synthetic", "synthetic"), sci, dq, var_p, var_r, err, fsync=False,
               sci_cards=sci_cards)
    return path
