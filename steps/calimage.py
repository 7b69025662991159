"""Stage-3 file edges: read what a cal image says about itself, read its arrays, write image products.

Metadata (gwcs, exposure times, pointing, sky level) comes from the ASDF extension that
stdatamodels writes into every product, parsed without touching the pixel arrays, so planning a
32-exposure association reads a few kB per file. Arrays are read on demand, one exposure at a time.
Products are written through stdatamodels' ``ImageModel`` (gwcs in the ASDF extension) to a
temporary name and renamed into place.
"""

from __future__ import annotations

import gc
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from astropy.io import fits

from .errors import InputError
from .products import save_model
from .image2 import ImageArrays
from .resample import ExposureTimes, ResampleInput, WcsReference

ARRAY_EXTENSIONS = ("SCI", "ERR", "DQ", "VAR_POISSON", "VAR_RNOISE", "VAR_FLAT")


@dataclass
class CalInfo:
    """What stage 3 needs to know about one calibrated image, without its pixels."""

    path: Path
    wcs: Any
    shape: tuple[int, int]
    group_id: str
    times: ExposureTimes
    reference: WcsReference
    primary: fits.Header
    meta: Mapping[str, Any]
    sky_level: float | None = None
    sky_subtracted: bool | None = None

    @property
    def name(self) -> str:
        return self.path.name

    def keyword(self, key: str, default: str = "") -> str:
        """A primary-header string keyword, stripped and upper-cased."""
        return str(self.primary.get(key, default)).strip().upper()

    @property
    def pixelarea_sr(self) -> float | None:
        value = self.meta.get("photometry", {}).get("pixelarea_steradians")
        return None if value is None else float(value)


def read_asdf_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta`` tree of a stdatamodels product's ASDF extension (gwcs objects deserialized)."""
    import asdf  # noqa: PLC0415

    try:
        with fits.open(path, memmap=False) as hdul:
            if "ASDF" not in hdul:
                raise InputError(path, "no ASDF extension: not written by stdatamodels (no gwcs)")
            raw = hdul["ASDF"].data["ASDF_METADATA"][0].tobytes()
    except InputError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise InputError(path, f"cannot read the ASDF extension ({exc})") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with asdf.open(io.BytesIO(raw), lazy_load=True, memmap=False) as af:
                return dict(af.tree.get("meta", {}))
    except Exception as exc:  # asdf raises many kinds for a damaged tree
        raise InputError(path, f"cannot parse the ASDF metadata ({exc})") from exc


def group_id_of(meta: Mapping[str, Any], path: str | Path) -> str:
    """jwst's exposure group id (``jw<prog><obs><visit>_<vgroup><seq><act>_<expnum>``)."""
    if meta.get("group_id"):
        return str(meta["group_id"])
    obs = meta.get("observation", {})
    keys = ("program_number", "observation_number", "visit_number", "visit_group", "sequence_id",
            "activity_id", "exposure_number")
    missing = [k for k in keys if k not in obs]
    if missing:
        raise InputError(path, "cannot group exposures: meta.observation lacks " + ", ".join(missing))
    return (f"jw{obs['program_number']}{obs['observation_number']}{obs['visit_number']}"
            f"_{obs['visit_group']}{obs['sequence_id']}{obs['activity_id']}_{obs['exposure_number']}")


def read_cal_info(path: str | Path) -> CalInfo:
    """Header, gwcs and metadata of a cal (or crf) image; InputError names the file and problem."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file does not exist")
    try:
        with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
            primary = hdul[0].header.copy()
            if "SCI" not in hdul:
                raise InputError(path, "no SCI extension: not a calibrated image")
            sci = hdul["SCI"].header
            shape = tuple(int(sci.get(f"NAXIS{i}", 0)) for i in (2, 1))
            if int(sci.get("NAXIS", 0)) != 2:
                raise InputError(path, f"SCI must be a 2-D image, found NAXIS={sci.get('NAXIS')}")
    except InputError:
        raise
    except (OSError, ValueError, TypeError, IndexError) as exc:
        raise InputError(path, f"not a readable FITS file ({exc})") from exc
    meta = read_asdf_meta(path)
    wcs = meta.get("wcs")
    if wcs is None:
        raise InputError(path, "no gwcs in the metadata: run calwebb_image2 (assign_wcs) first")
    info = meta.get("wcsinfo", {})
    missing = [k for k in ("ra_ref", "dec_ref", "roll_ref", "v3yangle", "vparity") if info.get(k) is None]
    if missing:
        raise InputError(path, "meta.wcsinfo lacks " + ", ".join(missing))
    exposure = meta.get("exposure", {})
    if not exposure.get("exposure_time"):
        raise InputError(path, "no positive exposure time (meta.exposure.exposure_time / EFFEXPTM)")
    times = ExposureTimes(float(exposure["exposure_time"]), _opt_float(exposure.get("start_time")),
                          _opt_float(exposure.get("end_time")), _opt_float(exposure.get("duration")),
                          _opt_float(exposure.get("measurement_time")))
    reference = WcsReference(float(info["ra_ref"]), float(info["dec_ref"]), float(info["roll_ref"]),
                             float(info["v3yangle"]), int(info["vparity"]))
    background = meta.get("background", {}) or {}
    return CalInfo(path, wcs, (shape[0], shape[1]), group_id_of(meta, path), times, reference, primary, meta,
                   _opt_float(background.get("level")), background.get("subtracted"))


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def read_cal_arrays(path: str | Path, shape: tuple[int, int] | None = None, *, err: bool = True) -> ImageArrays:
    """SCI/ERR/VAR_* as native float32 and DQ as uint32, (ny, nx); VAR_FLAT None when absent.

    ``err=False`` leaves ERR unread (None), for passes that do not use it. Each extension's file
    copy is dropped as soon as it is converted, so reading costs one image beyond the result.
    """
    path = Path(path)
    try:
        with fits.open(path, memmap=False) as hdul:
            names = {h.name for h in hdul}
            for ext in ("SCI", "ERR", "DQ", "VAR_POISSON", "VAR_RNOISE"):
                if ext not in names:    # (every calwebb_image2 product has them; the weights need VAR_RNOISE)
                    raise InputError(path, f"no {ext} extension")
            arrays = {}
            for ext in ARRAY_EXTENSIONS:
                if ext in names and (err or ext != "ERR"):
                    dtype = np.uint32 if ext == "DQ" else np.float32
                    arrays[ext] = np.ascontiguousarray(hdul[ext].data, dtype=dtype)
                    del hdul[ext].data
    except InputError:
        raise
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(path, f"cannot read the image arrays ({exc})") from exc
    want = shape or arrays["SCI"].shape
    for ext, array in arrays.items():
        if array.shape != tuple(want):
            raise InputError(path, f"{ext} shape {array.shape} differs from {tuple(want)}")
    return ImageArrays(arrays["SCI"], arrays.get("ERR"), arrays["DQ"], arrays["VAR_POISSON"], arrays["VAR_RNOISE"],
                       arrays.get("VAR_FLAT"))


def resample_input(info: CalInfo, arrays: ImageArrays, wcs: Any = None) -> ResampleInput:
    """A :class:`ResampleInput` of an image's arrays and metadata (``wcs`` overrides the file's)."""
    return ResampleInput(arrays.sci, arrays.dq, info.wcs if wcs is None else wcs, info.times, info.group_id,
                         arrays.var_rnoise, arrays.var_poisson, arrays.var_flat, info.sky_level,
                         bool(info.sky_subtracted), info.name)


def write_image_like(source: str | Path, out: str | Path, arrays: ImageArrays,
                     update: Callable[[Any], None] | None = None) -> Path:
    """A copy of image product ``source`` with new arrays (and ``update(model)`` applied), saved
    atomically as ``out`` through ImageModel."""
    from stdatamodels.jwst.datamodels import ImageModel  # noqa: PLC0415

    out = Path(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ImageModel(str(source), validate_on_assignment=False)
    try:
        arrays.to_model(model)
        if update is not None:
            update(model)
        model.meta.filename = out.name
        return save_model(model, out)
    finally:
        model.close()
        del model
        gc.collect()    # the model's arrays sit in reference cycles (asdf tree): free them now


__all__ = ["CalInfo", "group_id_of", "read_asdf_meta", "read_cal_arrays", "read_cal_info", "resample_input",
           "save_model", "write_image_like"]
