"""Writing JWST products (ramp, rate, rateints) as stdatamodels lays them out.

Headers: the input's primary header, updated with DATAMODL, FILENAME, DATE, and provenance —
CAL_VER, CAL_VCS, CRDS_VER, CRDS_CTX, R_<REFTYPE>, S_<STEP>. Arrays keep JWST dtypes: float32
SCI/ERR/VAR_*, uint32 DQ/PIXELDQ, uint8 GROUPDQ.
"""

from __future__ import annotations

import datetime as _dt
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from astropy.io import fits

from .fitsio import write_hdulist

_STRUCTURAL = ("SIMPLE", "BITPIX", "NAXIS", "EXTEND", "NAXIS1", "NAXIS2", "NAXIS3", "NAXIS4",
               "BZERO", "BSCALE", "CHECKSUM", "DATASUM")


def software_version() -> str:
    try:
        return metadata.version("calstream")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def reference_keyword(reftype: str) -> str:
    """The primary-header keyword recording a reference: R_MASK, R_SATURA, R_READNO, ..."""
    return "R_" + reftype.upper().replace("PARS-", "P")[:6]


@dataclass
class Provenance:
    """What produced a product: software, CRDS context, references used, step statuses."""

    crds_context: str
    crds_version: str
    references: dict[str, str] = field(default_factory=dict)   # reftype -> crds://name | path | N/A
    step_status: dict[str, str] = field(default_factory=dict)  # S_<STEP> keyword -> COMPLETE | SKIPPED
    extra: dict[str, object] = field(default_factory=dict)     # e.g. PRIMECRS

    def apply(self, header: fits.Header) -> None:
        header["CAL_VER"] = (software_version(), "Calibration software version (calstream)")
        header["CAL_VCS"] = ("RELEASE", "Calibration software repository version")
        header["CRDS_VER"] = (self.crds_version, "Version of CRDS file selection software used")
        header["CRDS_CTX"] = (self.crds_context, "CRDS context (.pmap) used to select ref files")
        for reftype, value in sorted(self.references.items()):
            comment = f"{reftype} reference file used"
            fits_comment = len(value) + len(comment) < 60
            header[reference_keyword(reftype)] = (value, comment) if fits_comment else value
        for keyword, status in self.step_status.items():
            header[keyword] = status
        for keyword, value in self.extra.items():
            header[keyword] = value


def primary_header(source: fits.Header, datamodel: str, filename: str, provenance: Provenance) -> fits.Header:
    """A product primary header derived from the input's."""
    header = fits.Header([card for card in source.cards if card.keyword not in _STRUCTURAL])
    header["DATAMODL"] = datamodel
    header["FILENAME"] = filename
    header["DATE"] = (_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3],
                      "UTC date file created")
    header["ORIGIN"] = header.get("ORIGIN", "STSCI")
    provenance.apply(header)
    return header


def _science_header(source: fits.Header, bunit: str | None) -> fits.Header:
    header = fits.Header()
    if bunit:
        header["BUNIT"] = bunit
    for src, dst in (("EXPSTART", "MJD-BEG"), ("EXPMID", "MJD-AVG"), ("EXPEND", "MJD-END"),
                     ("EFFEXPTM", "XPOSURE"), ("DURATION", "TELAPSE")):
        if src in source:
            header[dst] = source[src]
    return header


#: SCI-header keywords (jwst's meta.wcsinfo / meta.velocity_aberration) carried from an input
#: exposure to its products: the pointing that calwebb_image2's assign_wcs needs
CARRIED_SCI_KEYWORDS = (
    "WCSAXES", "CRPIX1", "CRPIX2", "CRVAL1", "CRVAL2", "CTYPE1", "CTYPE2", "CUNIT1", "CUNIT2",
    "CDELT1", "CDELT2", "PC1_1", "PC1_2", "PC2_1", "PC2_2", "RADESYS", "PA_APER", "RA_V1",
    "DEC_V1", "PA_V3", "VA_SCALE", "VA_RA", "VA_DEC", "V2_REF", "V3_REF", "VPARITY", "V3I_YANG",
    "RA_REF", "DEC_REF", "ROLL_REF", "XREF_SCI", "YREF_SCI", "S_REGION", "EXTVER", "VELOSYS",
)


def carried_sci_cards(sci_header: fits.Header) -> fits.Header:
    """The :data:`CARRIED_SCI_KEYWORDS` present in an input's SCI header (order kept)."""
    return fits.Header([card for card in sci_header.cards if card.keyword in CARRIED_SCI_KEYWORDS])


def _image(name: str, array: np.ndarray, header: fits.Header | None = None) -> fits.ImageHDU:
    hdu = fits.ImageHDU(array, header=header, name=name)
    return hdu


def product_path(output_dir: str | Path, input_name: str, suffix: str) -> Path:
    """``jw..._nrca1_uncal.fits`` -> ``<output_dir>/jw..._nrca1_<suffix>.fits``."""
    stem = Path(input_name).name
    for ext in (".fits", ".fit"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    base, _, last = stem.rpartition("_")
    if base and last in KNOWN_SUFFIXES:
        stem = base
    return Path(output_dir) / f"{stem}_{suffix}.fits"


KNOWN_SUFFIXES = frozenset({
    "uncal", "ramp", "rate", "rateints", "trapsfilled", "cal", "calints", "i2d", "crf", "x1d",
    "dqinit", "dq_init", "saturation", "superbias", "refpix", "linearity", "dark_current", "jump",
    "ramp_fit", "group_scale", "ipc", "charge_migration", "gain_scale",
})


def write_rate(path: str | Path, source_header: fits.Header, provenance: Provenance, sci: np.ndarray,
               dq: np.ndarray, var_poisson: np.ndarray, var_rnoise: np.ndarray, err: np.ndarray,
               fsync: bool = True, sci_cards: fits.Header | None = None) -> Path:
    """A rate (2-D: ImageModel) or rateints (3-D: CubeModel) product, SCI in DN/s.

    ``sci_cards`` (see :func:`carried_sci_cards`) go into the SCI header (pointing / WCS)."""
    path = Path(path)
    model = "ImageModel" if sci.ndim == 2 else "CubeModel"
    science = _science_header(source_header, "DN/s")
    for card in (sci_cards.cards if sci_cards is not None else ()):
        if card.keyword not in science:
            science.append(card)
    hdul = fits.HDUList([
        fits.PrimaryHDU(header=primary_header(source_header, model, path.name, provenance)),
        _image("SCI", _f32(sci), science),
        _image("ERR", _f32(err), _science_header(source_header, "DN/s")),
        _image("DQ", dq.astype(np.uint32, copy=False)),
        _image("VAR_POISSON", _f32(var_poisson), fits.Header([("BUNIT", "(DN/s)^2")])),
        _image("VAR_RNOISE", _f32(var_rnoise), fits.Header([("BUNIT", "(DN/s)^2")])),
    ])
    write_hdulist(hdul, path, fsync=fsync)
    return path


def write_ramp(path: str | Path, source_header: fits.Header, provenance: Provenance, sci: np.ndarray,
               pixeldq: np.ndarray, groupdq: np.ndarray, err: np.ndarray | None = None,
               fsync: bool = True, average_dark_current: float | np.ndarray | None = None) -> Path:
    """A ramp product (RampModel): SCI float32 (nints, ngroups, ny, nx) in DN.

    ``average_dark_current`` (e-/s, scalar or (ny, nx)), when given, is written as the AVDRKCUR
    image, as jwst's RampModel carries it from the dark step to ramp fitting.
    """
    path = Path(path)
    err = np.zeros(sci.shape, dtype=np.float32) if err is None else err
    hdus = [
        fits.PrimaryHDU(header=primary_header(source_header, "RampModel", path.name, provenance)),
        _image("SCI", _f32(sci), _science_header(source_header, "DN")),
        _image("PIXELDQ", pixeldq.astype(np.uint32, copy=False)),
        _image("GROUPDQ", groupdq.astype(np.uint8, copy=False)),
        _image("ERR", _f32(err), fits.Header([("BUNIT", "DN")])),
    ]
    if average_dark_current is not None:
        avg = np.broadcast_to(np.asarray(average_dark_current, dtype=np.float32), pixeldq.shape)
        hdus.append(_image("AVDRKCUR", np.ascontiguousarray(avg), fits.Header([("BUNIT", "electron/s")])))
    write_hdulist(fits.HDUList(hdus), path, fsync=fsync)
    return path


def _f32(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32, copy=False)


def step_status_keywords(statuses: Mapping[str, str], keywords: Mapping[str, str]) -> dict[str, str]:
    """``{step: status}`` -> ``{S_<STEP>: status}`` using each step's keyword."""
    return {keywords[name]: status for name, status in statuses.items() if name in keywords}


def save_model(model: Any, out: str | Path, fsync: bool = True) -> Path:
    """Save a stdatamodels model as ``out`` atomically (and durably with ``fsync``, as the
    stage-1 products are).

    The file is written under its final name inside a temporary folder ``.<stem>.*.part`` next to
    ``out`` (so stdatamodels records the right FILENAME; the daemon removes such folders a killed
    writer left) and renamed into place.
    """
    import os  # noqa: PLC0415
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    from .fitsio import _fsync_dir  # noqa: PLC0415

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.stem}.", suffix=".part", dir=out.parent))
    try:
        tmp = tmpdir / out.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save(str(tmp))
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        tmp.replace(out)
        if fsync:
            _fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return out
