"""Inspect an arrival in the daemon's main process: checksum, headers (no data read), names.

Cheap by design (a few ms per file): the FITS headers give the instrument, EXP_TYPE, the array
shape (for the memory estimate) and the CRDS selection parameters; nothing here imports numba,
jwst or stdatamodels. A file that cannot be what it claims raises InputError naming the problem,
and the daemon quarantines it without running anything.

Product tree (JWST names): ``<output>/<jwPPPPP>/<exposure name>/`` for an exposure's stage 1 and 2
products (segments share their exposure's folder) and ``<output>/<jwPPPPP>/<product name>/`` for
stage 3 (``misc`` when a name carries no program).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from calstream.steps.errors import InputError

from .ledger import ExposureInfo, Member
from .sources import fits_expected_size

_SEGMENT = re.compile(r"-seg(\d{3})")
_PROGRAM = re.compile(r"^jw(\d{5})")
#: product suffixes a stem loses (one list for intake, ledger keys and Kafka event keys)
_SUFFIX = re.compile(r"_(uncal|ramp|rate|rateints|cal|calints|i2d|crf|cat|segm|asn)$")

STAGE1_PIPELINE = "calwebb_detector1"


def file_checksum(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's content."""
    with open(path, "rb") as fh:
        return "sha256:" + hashlib.file_digest(fh, "sha256").hexdigest()


def same_checksum(a: str, b: str) -> bool:
    """Compare checksums written as ``sha256:<hex>`` or bare hex."""
    return a.lower().removeprefix("sha256:") == b.lower().removeprefix("sha256:")


def name_stem(name: str) -> str:
    """``jw..._00001-seg001_nrca1_cal.fits`` -> ``jw..._00001-seg001_nrca1``."""
    stem = Path(name).name
    for ext in (".fits", ".fit", ".json", ".ecsv"):
        stem = stem.removesuffix(ext)
    return _SUFFIX.sub("", stem)


def exposure_name(stem: str) -> tuple[str, int | None]:
    """(name without the segment, segment number): ``x_00001-seg002_nrca1`` -> (``x_00001_nrca1``, 2)."""
    match = _SEGMENT.search(stem)
    if match is None:
        return stem, None
    return stem[: match.start()] + stem[match.end():], int(match.group(1))


def program_folder(name: str) -> str:
    match = _PROGRAM.match(name)
    return f"jw{match.group(1)}" if match else "misc"


def exposure_output_dir(root: Path, stem: str) -> Path:
    name = exposure_name(stem)[0]
    return root / program_folder(name) / name


def association_output_dir(root: Path, product_name: str, program: str | None = None) -> Path:
    folder = program_folder(product_name)
    if folder == "misc" and program and str(program).isdigit():
        folder = f"jw{int(program):05d}"
    return root / folder / product_name


def preload() -> None:
    """Import what intake uses (astropy.io.fits, the header validators) before the first arrival."""
    import importlib  # noqa: PLC0415

    for module in ("astropy.io.fits", "calstream.steps.asn", "calstream.steps.exposure", "calstream.steps.parameters"):
        importlib.import_module(module)


# ---------------------------------------------------------------------------------------------
# Exposures
# ---------------------------------------------------------------------------------------------

def read_exposure_info(path: Path, output_root: Path) -> ExposureInfo:
    """Validate an uncal file's structure and headers; the ExposureInfo for the ledger."""
    from astropy.io import fits  # noqa: PLC0415

    from calstream.steps.exposure import crds_parameters, exposure_from_header  # noqa: PLC0415

    state, _ = fits_expected_size(path)
    if state == "corrupt":
        raise InputError(path, "not a FITS file (does not start with a SIMPLE card)")
    if state == "partial":
        raise InputError(path, f"truncated FITS file: {path.stat().st_size} bytes is less than its headers declare")
    try:
        with fits.open(path, lazy_load_hdus=True, memmap=False) as hdul:
            primary = hdul[0].header.copy()
            sci = _sci_header(hdul, path)
    except InputError:
        raise
    except Exception as exc:  # astropy: OSError, ValueError, VerifyError, ... for damaged headers
        raise InputError(path, f"unreadable FITS headers ({type(exc).__name__}: {exc})") from exc
    shape = tuple(int(sci.get(f"NAXIS{n}", 0)) for n in range(int(sci.get("NAXIS", 0)), 0, -1))
    exposure = exposure_from_header(primary, path, shape)
    stem = name_stem(path.name)
    name, segment = exposure_name(stem)
    seg_total = primary.get("EXSEGTOT")
    return ExposureInfo(
        path=str(path), stem=stem, exposure_name=name, segment=segment,
        segment_total=int(seg_total) if segment is not None and seg_total else (1 if segment is None else None),
        instrument=exposure.instrument, detector=exposure.detector, exp_type=exposure.exp_type, shape=shape,
        nbytes=path.stat().st_size, crds_parameters=crds_parameters(primary),
        pipelines=_pipelines(exposure.exp_type), reftypes=_reftypes(exposure.exp_type),
        output_dir=str(exposure_output_dir(output_root, stem)))


def _sci_header(hdul, path: Path):
    for hdu in hdul:
        if hdu.name == "SCI":
            return hdu.header
    raise InputError(path, "no SCI extension: not a JWST exposure")


def _pipelines(exp_type: str) -> dict[str, str]:
    from .scheduler import STAGE2_PIPELINES  # noqa: PLC0415

    out = {"detector1": STAGE1_PIPELINE}
    if exp_type in STAGE2_PIPELINES:
        out["image2"] = STAGE2_PIPELINES[exp_type]
    return out


def _reftypes(exp_type: str) -> dict[str, list[str]]:
    """Reference types (including pars-*) each stage of this exposure's pipelines may use."""
    from calstream.steps.parameters import DETECTOR1_NIR, IMAGE2  # noqa: PLC0415

    def of(specs) -> list[str]:
        types = {r for s in specs for r in s.reftypes} | {s.pars_reftype for s in specs}
        return sorted(types)

    out = {"detector1": of(DETECTOR1_NIR) + ["pars-detector1pipeline"]}
    if "image2" in _pipelines(exp_type):
        out["image2"] = of(IMAGE2) + ["pars-image2pipeline"]
    return out


# ---------------------------------------------------------------------------------------------
# Associations
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AssociationInfo:
    asn_id: str
    asn_type: str
    asn_rule: str
    product_name: str
    program: str | None
    members: tuple[Member, ...]
    output_dir: str


def read_association_info(path: Path, output_root: Path) -> AssociationInfo:
    """Validate an association file (jwst layout, one product) for the ledger."""
    from calstream.steps.asn import load_association  # noqa: PLC0415

    asn = load_association(path)
    if not asn.science():
        raise InputError(path, "association has no science member (level 3 needs at least one)")
    asn_id = asn.asn_id or name_stem(path.name).removesuffix("_asn")
    program = asn.program
    members = tuple(Member(m.expname, m.exptype, name_stem(m.expname)) for m in asn.members)
    return AssociationInfo(asn_id, asn.asn_type, asn.asn_rule, asn.product_name,
                           None if program is None else str(program), members,
                           str(association_output_dir(output_root, asn.product_name, program)))


__all__ = ["AssociationInfo", "association_output_dir", "exposure_name", "exposure_output_dir", "file_checksum",
           "name_stem", "program_folder", "read_association_info", "read_exposure_info", "same_checksum"]
