"""Synthetic NIRCam reference files in the JWST (stdatamodels) reference formats.

Builders return ``astropy.io.fits.HDUList`` objects laid out as the real CRDS files:
primary header with the CRDS/datamodel keywords, SCI/ERR/DQ/COEFFS image extensions with
the reference dtypes and a DQ_DEF table describing the file's own DQ bits.  The MASK file
deliberately uses *non-standard* bit positions (see ``MASK_DQ_DEF``) so readers must
translate through DQ_DEF, as stdatamodels does on open.

Step-parameter references (``pars-*``) are ASDF files in the stpipe step-config format.

All content derives from :func:`detector.pixel_maps` and is deterministic in the seed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from astropy.io import fits

from .. import dqflags
from .detector import (subarray_cards, DETECTORS, SUBARRAYS, DetectorParams, PixelMaps, Subarray,
                       detector_info, frame_time, pixel_maps, subarray_for)

AUTHOR = "calstream synthetic generator"
ORIGIN = "CALSTREAM"
USEAFTER = "2022-01-01T00:00:00"
PARS_USEAFTER = "1900-01-01T00:00:00"
RECIPE_KEYWORD = "SYNTHKEY"
RECIPE_VERSION = 1

#: reftype -> DATAMODL (the stdatamodels class the file opens as)
REFERENCE_MODELS: dict[str, str] = {
    "mask": "MaskModel",
    "saturation": "SaturationModel",
    "superbias": "SuperBiasModel",
    "linearity": "LinearityModel",
    "dark": "DarkModel",
    "gain": "GainModel",
    "readnoise": "ReadnoiseModel",
}


# --------------------------------------------------------------------------------------
# DQ_DEF tables
# --------------------------------------------------------------------------------------

DqDefRow = tuple[int, str, str]   # (file bit, standard flag name, description)

#: The mask's own bit layout: compact and NOT the pipeline's bit positions.
MASK_DQ_DEF: tuple[DqDefRow, ...] = (
    (0, "DO_NOT_USE", "Bad pixel, do not use"),
    (1, "DEAD", "Dead pixel"),
    (2, "HOT", "Hot pixel"),
    (3, "WARM", "Warm pixel"),
    (4, "LOW_QE", "Low quantum efficiency"),
    (5, "OTHER_BAD_PIXEL", "Unstable or otherwise bad pixel"),
    (6, "REFERENCE_PIXEL", "Reference pixel"),
    (7, "TELEGRAPH", "Random telegraph noise"),
)


def standard_dq_def(names: Iterable[str]) -> tuple[DqDefRow, ...]:
    """DQ_DEF rows for ``names`` at their standard pipeline bit positions."""
    rows = []
    for name in names:
        value = dqflags.PIXEL[name]
        rows.append((value.bit_length() - 1, name, name.replace("_", " ").capitalize()))
    return tuple(sorted(rows))


SATURATION_DQ_DEF = standard_dq_def(["DO_NOT_USE", "NO_SAT_CHECK"])
LINEARITY_DQ_DEF = standard_dq_def(["DO_NOT_USE", "NO_LIN_CORR"])
SUPERBIAS_DQ_DEF = standard_dq_def(["DO_NOT_USE", "UNRELIABLE_BIAS"])
DARK_DQ_DEF = standard_dq_def(["DO_NOT_USE", "HOT", "WARM", "UNRELIABLE_DARK"])


def dq_def_table(rows: Sequence[DqDefRow]) -> np.ndarray:
    """DQ_DEF record array (BIT int32, VALUE uint32, NAME S40, DESCRIPTION S80)."""
    dtype = [("BIT", ">i4"), ("VALUE", ">u4"), ("NAME", "S40"), ("DESCRIPTION", "S80")]
    return np.array([(b, 1 << b, n, d) for b, n, d in rows], dtype=dtype)


def encode_dq(dq: np.ndarray, rows: Sequence[DqDefRow]) -> np.ndarray:
    """Pipeline-bit DQ (uint32) -> the file's own bits described by ``rows``.

    Pipeline flags not listed in ``rows`` are dropped (a reader cannot decode them).
    """
    dq = np.asarray(dq, dtype=np.uint32)
    out = np.zeros(dq.shape, dtype=np.uint32)
    for bit, name, _ in rows:
        std = np.uint32(dqflags.PIXEL[name])
        out[(dq & std) != 0] |= np.uint32(1 << bit)
    return out


def decode_dq(dq: np.ndarray, rows: Sequence[DqDefRow]) -> np.ndarray:
    """Inverse of :func:`encode_dq` (file bits -> pipeline bits)."""
    table = [{"VALUE": 1 << b, "NAME": n} for b, n, _ in rows]
    return dqflags.translate_reference_dq(dq, table)


# --------------------------------------------------------------------------------------
# Recipes: what a reference file contains (its identity for idempotent rebuilds)
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RefRecipe:
    """Everything that determines one reference file's content."""

    reftype: str
    detector: str
    subarray: str              # 'FULL' for full-frame references
    seed: int
    useafter: str = USEAFTER
    gain_factor: float = 1.0   # gain only: multiplier of the original gain map
    dark_frames: int = 0       # dark only: number of frames (planes)
    dark_subarray: str = ""    # dark only: readout whose frame time the dark follows
    params: DetectorParams = DetectorParams()

    def key(self) -> str:
        """Short content hash stored in the file header (keyword SYNTHKEY)."""
        blob = json.dumps({"v": RECIPE_VERSION, **asdict(self)}, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------

def _primary(recipe: RefRecipe, sub: Subarray, descrip: str, history: Iterable[str],
             extra: dict | None = None) -> fits.PrimaryHDU:
    info = detector_info(recipe.detector)
    hdr = fits.Header()
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
    cards = [
        ("DATE", now, "UTC date file created"),
        ("ORIGIN", ORIGIN, "Organization responsible for creating file"),
        ("TIMESYS", "UTC", "principal time system for time-related keywords"),
        ("FILETYPE", "REFERENCE", "Type of data in the file"),
        ("TELESCOP", "JWST", "Telescope used to acquire the data"),
        ("INSTRUME", "NIRCAM", "Instrument used to acquire the data"),
        ("DETECTOR", info.name, "Name of detector used to acquire the data"),
        ("MODULE", info.module, "NIRCam module: A or B"),
        ("CHANNEL", info.channel, "Instrument channel"),
        ("REFTYPE", recipe.reftype.upper(), "Reference file type"),
        ("DATAMODL", REFERENCE_MODELS[recipe.reftype], "Type of data model"),
        ("USEAFTER", recipe.useafter, "Use after date of the reference file"),
        ("PEDIGREE", "DUMMY", "The pedigree of the reference file"),
        ("DESCRIP", descrip),
        ("AUTHOR", AUTHOR, "Author of the reference file"),
        *subarray_cards(sub, info, "FULL" if sub.is_full else sub.name),
    ]
    for card in cards:
        hdr.append(card)
    for key, value in (extra or {}).items():
        hdr[key] = value
    hdr[RECIPE_KEYWORD] = (recipe.key(), "calstream synthetic recipe hash")
    for line in history:
        hdr.add_history(line)
    return fits.PrimaryHDU(header=hdr)


def _image(name: str, data: np.ndarray, bunit: str | None = None) -> fits.ImageHDU:
    hdu = fits.ImageHDU(data=data, name=name)
    if bunit:
        hdu.header["BUNIT"] = bunit
    return hdu


def _dq_hdus(dq_pipeline: np.ndarray, rows: Sequence[DqDefRow]) -> list[fits.hdu.base.ExtensionHDU]:
    return [fits.ImageHDU(data=encode_dq(dq_pipeline, rows), name="DQ"),
            fits.BinTableHDU(data=dq_def_table(rows), name="DQ_DEF")]


_HISTORY = (
    "Synthetic reference generated by calstream.steps.synth (deterministic, seeded).",
    "Pixel properties are a hash of (seed, detector, full-frame pixel position).",
)


def maps_for(recipe: RefRecipe) -> tuple[PixelMaps, Subarray]:
    """Pixel maps and the subarray window of a recipe."""
    sub = subarray_for(recipe.detector, recipe.subarray)
    maps = pixel_maps(recipe.detector, recipe.seed, sub.y0, sub.x0, sub.ysize, sub.xsize,
                      recipe.params)
    return maps, sub


def build_reference(recipe: RefRecipe, maps: PixelMaps | None = None) -> fits.HDUList:
    """HDUList of the reference file described by ``recipe``."""
    if maps is None:
        maps, sub = maps_for(recipe)
    else:
        sub = subarray_for(recipe.detector, recipe.subarray)
    kind = recipe.reftype
    hist = list(_HISTORY)
    if kind == "mask":
        prim = _primary(recipe, sub, "Synthetic bad pixel mask (non-standard DQ bits)", hist,
                        {"EXP_TYPE": "NRC_IMAGE"})
        hdus = [prim, fits.ImageHDU(data=encode_dq(maps.mask_dq, MASK_DQ_DEF), name="DQ"),
                fits.BinTableHDU(data=dq_def_table(MASK_DQ_DEF), name="DQ_DEF")]
    elif kind == "saturation":
        prim = _primary(recipe, sub, "Synthetic saturation thresholds (DN incl. bias)", hist)
        hdus = [prim, _image("SCI", maps.sat_thresh, "DN"),
                *_dq_hdus(maps.sat_dq, SATURATION_DQ_DEF)]
    elif kind == "superbias":
        prim = _primary(recipe, sub, "Synthetic super bias", hist,
                        {"READPATT": "ANY", "NOUTPUTS": sub.noutputs})
        err = np.full(maps.shape, 2.0, dtype=np.float32)
        hdus = [prim, _image("SCI", maps.superbias, "DN"), _image("ERR", err, "DN"),
                *_dq_hdus(maps.bias_dq, SUPERBIAS_DQ_DEF)]
    elif kind == "linearity":
        prim = _primary(recipe, sub, "Synthetic linearity correction, 5 coefficients", hist)
        hdus = [prim, _image("COEFFS", maps.coeffs),
                *_dq_hdus(maps.lin_dq, LINEARITY_DQ_DEF)]
    elif kind == "gain":
        prim = _primary(recipe, sub, "Synthetic gain", hist)
        data = (maps.gain * np.float32(recipe.gain_factor)).astype(np.float32)
        hdus = [prim, _image("SCI", data, "ELECTRONS/DN")]
    elif kind == "readnoise":
        prim = _primary(recipe, sub, "Synthetic CDS read noise", hist,
                        {"READPATT": "ANY", "NOUTPUTS": sub.noutputs})
        hdus = [prim, _image("SCI", maps.readnoise, "DN")]
    elif kind == "dark":
        readout = subarray_for(recipe.detector, recipe.dark_subarray or recipe.subarray)
        nfr = int(recipe.dark_frames)
        tfr = frame_time(readout)
        avg_e = float(np.median((maps.dark_rate * maps.gain)[~maps.is_ref]))
        prim = _primary(recipe, sub, f"Synthetic dark, {nfr} RAPID frames", hist, {
            "EXP_TYPE": "NRC_DARK", "READPATT": "RAPID", "NFRAMES": 1, "GROUPGAP": 0,
            "NGROUPS": nfr, "NINTS": 1, "NOUTPUTS": readout.noutputs,
            "AVDRKCUR": (round(avg_e, 6), "Average dark current [e-/s]"),
        })
        data = dark_cube(maps.dark_rate, tfr, nfr)
        err = np.broadcast_to((maps.readnoise / np.float32(np.sqrt(2 * 50)))[None],
                              data.shape).astype(np.float32)
        hdus = [prim, _image("SCI", data, "DN"), _image("ERR", err, "DN"),
                *_dq_hdus(maps.dark_dq, DARK_DQ_DEF)]
    else:
        raise ValueError(f"no synthetic builder for reference type {kind!r}")
    return fits.HDUList(hdus)


def dark_cube(dark_rate: np.ndarray, tframe: float, nframes: int) -> np.ndarray:
    """(nframes, ny, nx) float32 dark signal [DN] at frame k = rate x (k+1) x tframe."""
    t = (np.arange(nframes, dtype=np.float32) + 1) * np.float32(tframe)
    return t[:, None, None] * dark_rate[None].astype(np.float32)


def existing_recipe_key(path: str | os.PathLike) -> str | None:
    """The SYNTHKEY of an existing reference file, or None if absent/unreadable."""
    try:
        return fits.getval(path, RECIPE_KEYWORD, ext=0)
    except (OSError, KeyError):
        return None


def write_reference(recipe: RefRecipe, path: str | os.PathLike, *,
                    maps: PixelMaps | None = None, force: bool = False) -> bool:
    """Write the reference unless ``path`` already holds the same recipe; True if written.

    Written atomically (temporary file + rename) so concurrent readers never see a
    partial file.
    """
    path = Path(path)
    if not force and path.exists() and existing_recipe_key(path) == recipe.key():
        return False
    hdul = build_reference(recipe, maps)
    hdul[0].header["FILENAME"] = path.name
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    hdul.writeto(tmp, overwrite=True)
    os.replace(tmp, path)
    return True


# --------------------------------------------------------------------------------------
# Step-parameter references (ASDF)
# --------------------------------------------------------------------------------------

PARS_DATE = "2024-01-01T00:00:00"


def pars_tree(reftype: str, class_name: str, name: str, parameters: dict,
              steps: Sequence[dict] = (), description: str = "") -> dict:
    """Tree of a ``pars-*`` reference in stpipe's step_config format with CRDS metadata."""
    tree = {
        "class": class_name,
        "name": name,
        "parameters": dict(parameters),
        "meta": {
            "author": AUTHOR,
            "date": PARS_DATE,
            "description": description or f"Synthetic {reftype} parameters",
            "instrument": {"name": "NIRCAM"},
            "origin": ORIGIN,
            "pedigree": "DUMMY",
            "reftype": reftype,
            "telescope": "JWST",
            "useafter": PARS_USEAFTER,
            "history": "Synthetic step parameters generated by calstream.steps.synth.",
        },
    }
    if steps:
        tree["steps"] = [dict(s) for s in steps]
    return tree


#: reftype -> tree of the parameter references the synthetic cache provides.
PARS_REFERENCES: dict[str, dict] = {
    "pars-detector1pipeline": pars_tree(
        "pars-detector1pipeline", "jwst.pipeline.calwebb_detector1.Detector1Pipeline",
        "Detector1Pipeline", {"save_calibrated_ramp": False},
        description="Detector1Pipeline defaults for NIRCam imaging"),
    "pars-jumpstep": pars_tree(
        "pars-jumpstep", "jwst.jump.jump_step.JumpStep", "jump",
        {"rejection_threshold": 4.0},
        description="JumpStep parameters for NIRCam"),
    # Undersampled filters: the blotted median of dithered exposures is broader than one
    # exposure's PSF core (pixel phases differ), so the derivative allowance must be larger
    # than jwst's default 1.2 0.7 or star cores get flagged (jwst issue 9989).
    "pars-outlierdetectionstep": pars_tree(
        "pars-outlierdetectionstep", "jwst.outlier_detection.outlier_detection_step.OutlierDetectionStep",
        "outlier_detection", {"scale": "2.5 1.2"},
        description="OutlierDetectionStep parameters for undersampled NIRCam imaging filters"),
}
#: filters the NIRCam pars-outlierdetectionstep applies to (PSF FWHM below ~2 pixels)
UNDERSAMPLED_FILTERS: tuple[str, ...] = ("F070W", "F090W", "F115W", "F150W", "F200W", "F277W", "F356W")


def asdf_text(tree: dict) -> str:
    """A tree as a block-less ASDF 1.0.0 file (ASDF standard 1.5.0), deterministic text.

    Written directly as YAML: importing the ``asdf`` library costs seconds (plug-in
    discovery), and a tree of plain scalars/maps/lists needs no tags beyond the root.
    """
    import yaml

    body = yaml.safe_dump(tree, sort_keys=True, default_flow_style=False, width=100)
    software = ("asdf_library: !core/software-1.0.0 {author: calstream, "
                "homepage: 'https://github.com/', name: calstream.steps.synth, version: 0.1.0}\n")
    # ASDF file history (crds certify reads it as the file's HISTORY)
    when = tree.get("meta", {}).get("date", PARS_DATE).replace("T", " ")
    what = tree.get("meta", {}).get("history", "calstream synthetic file")
    history = ("history:\n  entries:\n  - !core/history_entry-1.0.0 {description: "
               + json.dumps(what) + ", time: ! '" + when + "'}\n")
    return ("#ASDF 1.0.0\n#ASDF_STANDARD 1.5.0\n%YAML 1.1\n%TAG ! tag:stsci.edu:asdf/\n"
            "--- !core/asdf-1.1.0\n" + software + history + body + "...\n")


def write_pars(reftype: str, path: str | os.PathLike, tree: dict | None = None) -> bool:
    """Write a ``pars-*`` ASDF reference unless an identical one exists; True if written."""
    path = Path(path)
    text = asdf_text(tree or PARS_REFERENCES[reftype])
    if path.exists() and path.read_text() == text:
        return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True


# --------------------------------------------------------------------------------------
# Naming
# --------------------------------------------------------------------------------------

GAIN_V2_OFFSET = 5000


def reference_serial(detector: str, subarray: str, version: int = 1) -> int:
    """Stable 4-digit CRDS serial: 100 x subarray code + detector index + 1 (+5000 for v2)."""
    code = SUBARRAYS.index(subarray.upper())
    serial = 100 * code + DETECTORS.index(detector.upper()) + 1
    return serial + (GAIN_V2_OFFSET if version > 1 else 0)


def reference_name(reftype: str, detector: str, subarray: str, version: int = 1) -> str:
    """CRDS-style file name, e.g. ``jwst_nircam_gain_0301.fits``."""
    return f"jwst_nircam_{reftype}_{reference_serial(detector, subarray, version):04d}.fits"


def pars_name(reftype: str) -> str:
    """CRDS-style name of a parameter reference, e.g. ``jwst_nircam_pars-jumpstep_0001.asdf``."""
    return f"jwst_nircam_{reftype}_0001.asdf"


__all__ = [
    "MASK_DQ_DEF", "PARS_REFERENCES", "UNDERSAMPLED_FILTERS", "REFERENCE_MODELS", "RefRecipe", "build_reference",
    "dark_cube", "decode_dq", "dq_def_table", "encode_dq", "existing_recipe_key",
    "maps_for", "pars_name", "pars_tree", "reference_name",
    "reference_serial", "standard_dq_def", "write_pars", "write_reference",
]
