"""Exposure metadata: the keywords detector1 needs, read and validated from a primary header."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from astropy.io import fits

from .errors import InputError

KNOWN_INSTRUMENTS = ("NIRCAM", "NIRISS", "NIRSPEC", "FGS", "MIRI")
NEAR_IR = ("NIRCAM", "NIRISS", "NIRSPEC", "FGS")

#: keywords detector1 cannot run without, with their meaning for error messages
REQUIRED_KEYWORDS: dict[str, str] = {
    "INSTRUME": "instrument name",
    "DETECTOR": "detector name",
    "EXP_TYPE": "exposure type",
    "READPATT": "readout pattern",
    "NINTS": "number of integrations",
    "NGROUPS": "number of groups per integration",
    "NFRAMES": "number of frames per group",
    "GROUPGAP": "number of frames dropped between groups",
    "TFRAME": "frame time [s]",
    "TGROUP": "group time [s]",
    "DATE-OBS": "observation date",
    "TIME-OBS": "observation time",
    "SUBARRAY": "subarray name",
}


@dataclass(frozen=True)
class Exposure:
    """What detector1 needs to know about an exposure (from its primary header).

    Subarray corner ``substrt1``/``substrt2`` is 1-based (FITS), in the detector (DMS) frame.
    """

    path: str
    instrument: str
    detector: str
    exp_type: str
    readpatt: str
    nints: int
    ngroups: int
    nframes: int
    groupgap: int
    frmdivsr: int
    drpfrms1: int
    frame_time: float   # s
    group_time: float   # s
    subarray: str
    substrt1: int
    substrt2: int
    subsize1: int       # columns
    subsize2: int       # rows
    noutputs: int
    fastaxis: int
    slowaxis: int
    date_obs: str
    time_obs: str
    gainfact: float | None
    header: fits.Header

    @property
    def is_full_frame(self) -> bool:
        return self.subarray.upper() == "FULL"

    @property
    def effective_integration_time(self) -> float:
        """s; used for the cosmic-ray rate keyword."""
        return float(self.header.get("EFFINTTM", self.group_time * (self.ngroups - 1)))


def exposure_from_header(header: fits.Header, path: str | Path, data_shape: tuple[int, ...]) -> Exposure:
    """Validate a primary header against the SCI shape and build an :class:`Exposure`."""
    path = str(path)
    missing = [f"{k} ({v})" for k, v in REQUIRED_KEYWORDS.items() if k not in header]
    if missing:
        raise InputError(path, "missing required keyword(s): " + ", ".join(missing))
    instrument = str(header["INSTRUME"]).strip().upper()
    if instrument not in KNOWN_INSTRUMENTS:
        raise InputError(path, f"unknown instrument INSTRUME={instrument!r}; expected one of "
                               + ", ".join(KNOWN_INSTRUMENTS))
    if len(data_shape) != 4:
        raise InputError(path, f"SCI must be 4-D (nints, ngroups, ny, nx); got shape {data_shape}")
    nints, ngroups, ny, nx = data_shape
    _check_int(header, "NGROUPS", ngroups, path)
    _check_int(header, "NINTS", nints, path, allow_segment=True)
    substrt1 = _int(header, "SUBSTRT1", 1, path)
    substrt2 = _int(header, "SUBSTRT2", 1, path)
    subsize1 = _int(header, "SUBSIZE1", nx, path)
    subsize2 = _int(header, "SUBSIZE2", ny, path)
    if (subsize2, subsize1) != (ny, nx):
        raise InputError(path, f"SUBSIZE2 x SUBSIZE1 = {subsize2} x {subsize1} does not match SCI "
                               f"rows x columns {ny} x {nx}")
    gainfact = header.get("GAINFACT")
    return Exposure(
        path=path, instrument=instrument, detector=str(header["DETECTOR"]).strip().upper(),
        exp_type=str(header["EXP_TYPE"]).strip().upper(), readpatt=str(header["READPATT"]).strip().upper(),
        nints=nints, ngroups=ngroups, nframes=_int(header, "NFRAMES", 1, path),
        groupgap=_int(header, "GROUPGAP", 0, path),
        frmdivsr=_int(header, "FRMDIVSR", _int(header, "NFRAMES", 1, path), path),
        drpfrms1=_int(header, "DRPFRMS1", 0, path),
        frame_time=_float(header, "TFRAME", path), group_time=_float(header, "TGROUP", path),
        subarray=str(header["SUBARRAY"]).strip().upper(), substrt1=substrt1, substrt2=substrt2,
        subsize1=subsize1, subsize2=subsize2, noutputs=_int(header, "NOUTPUTS", 4 if nx == 2048 else 1, path),
        fastaxis=_int(header, "FASTAXIS", 1, path), slowaxis=_int(header, "SLOWAXIS", 2, path),
        date_obs=str(header["DATE-OBS"]).strip(), time_obs=str(header["TIME-OBS"]).strip(),
        gainfact=None if gainfact in (None, "") else float(gainfact), header=header,
    )


def _int(header: fits.Header, key: str, default: int, path: str) -> int:
    value = header.get(key, default)
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"keyword {key}={value!r} is not an integer") from exc


def _float(header: fits.Header, key: str, path: str) -> float:
    value = header.get(key)
    try:
        out = float(value)
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"keyword {key}={value!r} is not a number") from exc
    if not out > 0:
        raise InputError(path, f"keyword {key}={value!r} must be positive")
    return out


def _check_int(header: fits.Header, key: str, actual: int, path: str, allow_segment: bool = False) -> None:
    declared = _int(header, key, actual, path)
    if declared == actual:
        return
    if allow_segment and "INTSTART" in header and "INTEND" in header:
        seg = _int(header, "INTEND", 0, path) - _int(header, "INTSTART", 0, path) + 1
        if seg == actual:
            return
    raise InputError(path, f"keyword {key}={declared} does not match the SCI array ({actual})")


def crds_parameters(header: fits.Header) -> dict[str, Any]:
    """The CRDS selection parameters of an exposure: ``{"META.INSTRUMENT.NAME": "NIRCAM", ...}``.

    What jwst's ``model.get_crds_parameters()`` gives, from the primary-header keywords that the
    JWST datamodel schemas map to metadata paths (``data/fits_to_meta.json``, generated from
    stdatamodels; a test checks it). Passing META.* names spares crds its own, slow, schema walk.
    """
    table = _fits_to_meta()
    params: dict[str, Any] = {}
    for card in header.cards:
        meta = table.get(card.keyword)
        if meta is not None and isinstance(card.value, (str, int, float, bool)):
            params[meta] = card.value
    return params


@functools.cache
def _fits_to_meta() -> dict[str, str]:
    with resources.files(__package__).joinpath("data/fits_to_meta.json").open() as fh:
        return dict(json.load(fh))
