"""calwebb_image2 for NIRCam imaging: a rate product (DN/s) -> a cal product (MJy/sr).

Steps, in jwst's order: bkg_subtract (no background members in a single-exposure input:
SKIPPED), assign_wcs (imaging gwcs from the pointing keywords and the distortion/filteroffset
references, plus a FITS/SIP approximation), flat_field, photom, resample (the exposure drizzled
onto its own grid, ``<name>_i2d.fits``; off by default here, jwst runs it:
``--steps.resample.skip=false``).

The arithmetic is element-wise, so the kernels below are plain numpy on float32 arrays of any
shape (a row chunk gives the same answer as the whole frame). :func:`plan_image2` decides what
runs; :func:`run_image2` executes a plan on a rate file and writes the cal product through
stdatamodels' ImageModel (which carries the gwcs in the ASDF extension).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import structlog
from astropy.io import fits

from . import dqflags
from .crdsrefs import NOT_APPLICABLE, context_name, crds_version, reference_uri
from .errors import InputError, ReferenceFileError, StepNotImplementedError
from .exposure import crds_parameters
from .parameters import IMAGE2, NOT_IMPLEMENTED, StepSpec
from .planning import resolve_parameters, select_step_references
from .products import product_path, save_model

log = structlog.get_logger("calstream.steps.image2")

COMPLETE, SKIPPED = "COMPLETE", "SKIPPED"
PIPELINE = "calwebb_image2"
#: (MJy/sr) -> (uJy/arcsec^2)
MJSR_TO_UJA2 = 1.0e12 * (math.pi / 180.0 / 3600.0) ** 2
IMAGING_EXP_TYPES = ("NRC_IMAGE",)
POINTING_KEYWORDS = ("RA_REF", "DEC_REF", "ROLL_REF", "V2_REF", "V3_REF")
_DNU = int(dqflags.DO_NOT_USE)
_NO_FLAT = int(dqflags.NO_FLAT_FIELD)


# ---------------------------------------------------------------------------------------------
# Kernels: flat field and photometric calibration (element-wise, float32)
# ---------------------------------------------------------------------------------------------

@dataclass
class ImageArrays:
    """Science arrays of a 2-D image, all (ny, nx): float32 SCI/ERR/VAR_*, uint32 DQ."""

    sci: np.ndarray
    err: np.ndarray
    dq: np.ndarray
    var_poisson: np.ndarray
    var_rnoise: np.ndarray
    var_flat: np.ndarray | None = None

    def to_model(self, model: Any) -> None:
        """Set a stdatamodels ImageModel's SCI/ERR/DQ/VAR_* arrays to these."""
        model.data, model.err, model.dq = self.sci, self.err, self.dq
        model.var_poisson, model.var_rnoise = self.var_poisson, self.var_rnoise
        if self.var_flat is not None:
            model.var_flat = self.var_flat

    def section(self, rows: slice) -> "ImageArrays":
        """Views of rows ``rows`` (for chunked processing)."""
        vf = None if self.var_flat is None else self.var_flat[rows]
        return ImageArrays(self.sci[rows], self.err[rows], self.dq[rows], self.var_poisson[rows],
                           self.var_rnoise[rows], vf)


def prepare_flat(flat: np.ndarray, flat_dq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat values to divide by and the flat's DQ, as jwst's flat_field interprets them.

    NaN or zero flat values get DO_NOT_USE + NO_FLAT_FIELD; NO_FLAT_FIELD implies DO_NOT_USE;
    every DO_NOT_USE pixel's flat is replaced by 1 (the pixel is left uncorrected). Returns new
    arrays (float32, uint32) of the input's shape.
    """
    value = np.array(flat, dtype=np.float32, copy=True)
    dq = np.array(flat_dq, dtype=np.uint32, copy=True)
    bad_value = np.isnan(value) | (value == 0.0)
    dq[bad_value] |= np.uint32(_DNU | _NO_FLAT)
    dq[(dq & np.uint32(_NO_FLAT)) != 0] |= np.uint32(_DNU)
    value[(dq & np.uint32(_DNU)) != 0] = 1.0
    return value, dq


def apply_flat(arrays: ImageArrays, flat: np.ndarray, flat_err: np.ndarray, flat_dq: np.ndarray) -> None:
    """Divide by a prepared flat (see :func:`prepare_flat`), in place.

    SCI /= flat; VAR_FLAT = SCI_new^2 / flat^2 * flat_err^2; VAR_POISSON, VAR_RNOISE /= flat^2;
    ERR = sqrt(VAR_POISSON + VAR_RNOISE + VAR_FLAT); DQ |= flat DQ; then invalid pixels are
    made consistent (:func:`flag_invalid`). All arrays (ny, nx), float32 except DQ.
    """
    flat2 = flat * flat
    arrays.sci /= flat
    arrays.var_flat = (arrays.sci ** 2 / flat2 * flat_err ** 2).astype(np.float32, copy=False)
    arrays.var_poisson /= flat2
    arrays.var_rnoise /= flat2
    arrays.err[...] = np.sqrt(arrays.var_poisson + arrays.var_rnoise + arrays.var_flat)
    arrays.dq |= flat_dq.astype(np.uint32, copy=False)
    flag_invalid(arrays)


def flag_invalid(arrays: ImageArrays) -> None:
    """A pixel NaN in any of SCI/ERR/VAR_* or flagged DO_NOT_USE becomes NaN everywhere and
    DO_NOT_USE in DQ (in place)."""
    bad = (arrays.dq & np.uint32(_DNU)) != 0
    for a in (arrays.sci, arrays.err, arrays.var_rnoise, arrays.var_poisson, arrays.var_flat):
        if a is not None:
            bad |= np.isnan(a)
    arrays.dq[bad] |= np.uint32(_DNU)
    for a in (arrays.sci, arrays.err, arrays.var_rnoise, arrays.var_poisson, arrays.var_flat):
        if a is not None:
            a[bad] = np.nan


def apply_photom(arrays: ImageArrays, conversion: float) -> None:
    """DN/s -> MJy/sr, in place: SCI, ERR x conversion; VAR_* x conversion^2 (float32)."""
    c = np.float32(conversion)
    c2 = c * c
    arrays.sci *= c
    arrays.err *= c
    for var in (arrays.var_poisson, arrays.var_rnoise, arrays.var_flat):
        if var is not None:
            var *= c2


def photom_conversion(table: np.ndarray, filt: str, pupil: str, subarray: str | None = None) -> float | None:
    """PHOTMJSR [(MJy/sr)/(DN/s)] of the table row matching filter, pupil (and subarray when the
    table has that column); None when no row matches. Strings compare case-insensitively."""
    names = table.dtype.names or ()
    want = {"filter": filt, "pupil": pupil}
    if subarray is not None and "subarray" in names:
        want["subarray"] = subarray
    hits = np.ones(len(table), bool)
    for column, value in want.items():
        col = np.char.strip(np.char.upper(np.asarray(table[column]).astype(str)))
        hits &= col == str(value).strip().upper()
    rows = np.flatnonzero(hits)
    if len(rows) == 0:
        return None
    if len(rows) > 1:
        raise ReferenceFileError("photom", f"{len(rows)} rows match filter={filt} pupil={pupil}")
    return table["photmjsr"][rows[0]]


# ---------------------------------------------------------------------------------------------
# assign_wcs: the imaging gwcs
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pointing:
    """Pointing and aperture keywords of the SCI header (degrees; V2/V3 in arcsec)."""

    ra_ref: float
    dec_ref: float
    roll_ref: float
    v2_ref: float
    v3_ref: float
    va_scale: float | None = None

    @classmethod
    def from_header(cls, header: Mapping[str, Any], path: str) -> "Pointing":
        missing = [k for k in POINTING_KEYWORDS if header.get(k) is None]
        if missing:
            raise InputError(path, "no pointing for assign_wcs: SCI header lacks " + ", ".join(missing))
        va = header.get("VA_SCALE")
        return cls(*(float(header[k]) for k in POINTING_KEYWORDS), None if va is None else float(va))


def velocity_aberration_model(va_scale: float | None, v2_ref: float, v3_ref: float) -> Any:
    """V2V3 -> V2V3 scaled about the reference point by the velocity-aberration factor."""
    from astropy.modeling import models  # noqa: PLC0415

    if va_scale is None or va_scale == 1:
        return models.Identity(2)
    if va_scale <= 0:
        raise InputError(None, f"velocity aberration scale must be positive, got {va_scale}")
    model = models.Scale(va_scale) & models.Scale(va_scale)
    if v2_ref == 0 and v3_ref == 0:
        return model
    return model | (models.Shift((1 - va_scale) * v2_ref) & models.Shift((1 - va_scale) * v3_ref))


def v2v3_to_sky_model(p: Pointing) -> Any:
    """V2, V3 [arcsec] -> RA, Dec [deg]: the attitude as a z-y-x-y-z rotation sequence."""
    from astropy.modeling import models  # noqa: PLC0415
    from gwcs.geometry import CartesianToSpherical, SphericalToCartesian  # noqa: PLC0415

    angles = [p.v2_ref / 3600.0, -p.v3_ref / 3600.0, p.roll_ref, p.dec_ref, -p.ra_ref]
    model = ((models.Scale(1 / 3600) & models.Scale(1 / 3600))
             | SphericalToCartesian(wrap_lon_at=180)
             | models.RotationSequence3D(angles, axes_order="zyxyz")
             | CartesianToSpherical(wrap_lon_at=360))
    model.name = "v23tosky"
    return model


def read_distortion(path: str) -> Any:
    """The astropy model of a DistortionModel reference (full-frame pixel -> V2V3 arcsec)."""
    from stdatamodels.jwst.datamodels import DistortionModel  # noqa: PLC0415

    try:
        with DistortionModel(path) as ref:
            return ref.model
    except Exception as exc:  # stdatamodels/asdf raise many types for bad files
        raise ReferenceFileError("distortion", f"cannot read the distortion model ({exc})", path) from exc


def read_filter_offset(path: str | None, filt: str, pupil: str) -> tuple[float, float] | None:
    """(column, row) offset [pixels] of the filteroffset row for filter/pupil, or None."""
    if path is None or path == NOT_APPLICABLE:
        return None
    import asdf  # noqa: PLC0415

    try:
        with asdf.open(path) as af:
            rows = list(af.tree["filters"])
    except Exception as exc:
        raise ReferenceFileError("filteroffset", f"cannot read the filter table ({exc})", path) from exc
    for row in rows:
        if str(row.get("filter", "")).upper() == filt.upper() and str(row.get("pupil", "")).upper() == pupil.upper():
            col, rw = row.get("column_offset", "N/A"), row.get("row_offset", "N/A")
            if col != "N/A" and rw != "N/A":
                return float(col), float(rw)
    return None


def imaging_wcs(pointing: Pointing, distortion: Any, xstart: int, ystart: int, nx: int, ny: int,
                filter_offset: tuple[float, float] | None = None) -> Any:
    """gwcs of an imaging (sub)array: detector -> v2v3 -> v2v3vacorr -> world.

    ``xstart``/``ystart`` are the 1-based SUBSTRT1/2; the distortion acts on full-frame 0-based
    pixels after the filter offset shift. The bounding box is the (sub)array's pixel edges.
    """
    import gwcs.coordinate_frames as cf  # noqa: PLC0415
    from astropy import coordinates as coord  # noqa: PLC0415
    from astropy import units as u  # noqa: PLC0415
    from astropy.modeling import bind_bounding_box, models  # noqa: PLC0415
    from gwcs import WCS  # noqa: PLC0415

    det2v = distortion
    if filter_offset is not None:
        det2v = (models.Shift(filter_offset[0]) & models.Shift(filter_offset[1])) | det2v
    if xstart != 1 or ystart != 1:
        sx = models.Shift(xstart - 1) if xstart != 1 else models.Identity(1)
        sy = models.Shift(ystart - 1) if ystart != 1 else models.Identity(1)
        det2v = (sx & sy) | det2v
    bind_bounding_box(det2v, ((-0.5, nx - 0.5), (-0.5, ny - 0.5)), order="F")
    detector = cf.Frame2D(name="detector", axes_order=(0, 1), unit=(u.pix, u.pix))
    v2v3 = cf.Frame2D(name="v2v3", axes_order=(0, 1), axes_names=("v2", "v3"), unit=(u.arcsec, u.arcsec))
    v2v3va = cf.Frame2D(name="v2v3vacorr", axes_order=(0, 1), axes_names=("v2", "v3"),
                        unit=(u.arcsec, u.arcsec))
    world = cf.CelestialFrame(reference_frame=coord.ICRS(), name="world")
    va = velocity_aberration_model(pointing.va_scale, pointing.v2_ref, pointing.v3_ref)
    return WCS([(detector, det2v), (v2v3, va), (v2v3va, v2v3_to_sky_model(pointing)), (world, None)])


def fits_sip_header(wcs: Any, crpix: tuple[float, float] | None, max_pix_error: float = 0.01,
                    degree: int | None = None, max_inv_pix_error: float = 0.01,
                    inv_degree: int | None = None, npoints: int = 12) -> fits.Header:
    """A FITS TAN(-SIP) approximation of ``wcs`` over its bounding box (lowest degree 1..5 meeting
    the pixel-error limits when a degree is None)."""
    return wcs.to_fits_sip(max_pix_error=max_pix_error, degree=range(1, 6) if degree is None else degree,
                           max_inv_pix_error=max_inv_pix_error,
                           inv_degree=range(1, 6) if inv_degree is None else inv_degree,
                           npoints=npoints, crpix=None if crpix is None or None in crpix else list(crpix))


def s_region(wcs: Any) -> str:
    """The footprint polygon (bounding-box pixel edges) as an S_REGION string."""
    corners = wcs.footprint(center=False)
    return "POLYGON ICRS  " + " ".join(f"{ra:.9f} {dec:.9f}" for ra, dec in corners)


# ---------------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------------

@dataclass
class RateSource:
    """A rate product read whole (2-D ImageModel layout)."""

    path: str
    primary: fits.Header
    sci_header: fits.Header
    arrays: ImageArrays

    @property
    def exp_type(self) -> str:
        return str(self.primary.get("EXP_TYPE", "")).strip().upper()


def open_rate(path: str | Path) -> RateSource:
    """Read and validate a rate file; InputError names the file and the problem."""
    path = str(path)
    if not Path(path).is_file():
        raise InputError(path, "file does not exist")
    try:
        with fits.open(path, memmap=False) as hdul:
            names = [h.name for h in hdul]
            for ext in ("SCI", "ERR", "DQ", "VAR_POISSON", "VAR_RNOISE"):
                if ext not in names:
                    raise InputError(path, f"no {ext} extension: not a rate product")
            sci = hdul["SCI"].data
            if sci is None or sci.ndim != 2:
                shape = None if sci is None else sci.shape
                if sci is not None and sci.ndim == 3:
                    raise StepNotImplementedError(f"{path}: calwebb_image2 on a 3-D rateints product "
                                                  "(calints) is not implemented in calstream")
                raise InputError(path, f"SCI must be a 2-D image, found shape {shape}")
            arrays = ImageArrays(*(np.array(hdul[e].data, dtype=np.float32) for e in ("SCI", "ERR")),
                                 np.array(hdul["DQ"].data, dtype=np.uint32),
                                 *(np.array(hdul[e].data, dtype=np.float32) for e in ("VAR_POISSON", "VAR_RNOISE")))
            for name in ("err", "dq", "var_poisson", "var_rnoise"):
                if getattr(arrays, name).shape != arrays.sci.shape:
                    raise InputError(path, f"{name.upper()} shape {getattr(arrays, name).shape} differs "
                                           f"from SCI {arrays.sci.shape}")
            source = RateSource(path, hdul[0].header.copy(), hdul["SCI"].header.copy(), arrays)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(path, f"cannot read as FITS ({exc})") from exc
    if source.exp_type not in IMAGING_EXP_TYPES:
        raise StepNotImplementedError(f"{path}: calwebb_image2 for EXP_TYPE={source.exp_type or '?'} is not "
                                      f"implemented in calstream (only {', '.join(IMAGING_EXP_TYPES)})")
    bunit = str(source.sci_header.get("BUNIT", "DN/s")).strip()
    if bunit not in ("DN/s", "DN / s", "count/s"):
        raise InputError(path, f"SCI BUNIT is {bunit!r}: expected a rate product in DN/s")
    return source


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------

@dataclass
class Image2Plan:
    """Everything decided before any pixel is touched."""

    steps: tuple[StepSpec, ...]
    params: dict[str, dict[str, Any]]
    status: dict[str, str]
    skip_reason: dict[str, str]
    references: dict[str, str]        # reftype -> local path | N/A
    context: str
    pipeline_params: dict[str, Any] = field(default_factory=dict)
    parameter_sources: list[str] = field(default_factory=list)

    def runs(self, step: str) -> bool:
        return self.status.get(step) == COMPLETE


def plan_image2(primary: fits.Header, *, cli_steps: Mapping[str, Mapping[str, Any]] | None = None,
                cli_pipeline: Mapping[str, Any] | None = None, parameter_file: str | Path | None = None,
                context: str | None = None) -> Image2Plan:
    """Resolve parameters (defaults < CRDS pars-* < file < command line), statuses and references."""
    steps = IMAGE2
    ctx = context_name(context)
    params_crds = crds_parameters(primary)
    params, pipeline_params, sources = resolve_parameters(steps, PIPELINE, params_crds, ctx, parameter_file,
                                                          cli_steps, cli_pipeline)
    status, reasons = {}, {}
    for spec in steps:
        if params[spec.name]["skip"]:
            status[spec.name], reasons[spec.name] = SKIPPED, "skip=True"
        elif spec.name in NOT_IMPLEMENTED:
            raise StepNotImplementedError(f"step {spec.name} was requested (skip=False) but "
                                          f"{NOT_IMPLEMENTED[spec.name]}; set steps.{spec.name}.skip=true")
        elif spec.name == "bkg_subtract":
            status[spec.name], reasons[spec.name] = SKIPPED, "no background members (single exposure input)"
        else:
            status[spec.name] = COMPLETE
    if status.get("resample") == COMPLETE:
        from .resample_step import check_parameters  # noqa: PLC0415

        check_parameters(params["resample"])
    if params["flat_field"].get("inverse") or params["photom"].get("inverse"):
        raise StepNotImplementedError("inverse flat_field/photom is not implemented in calstream")
    if params["flat_field"].get("user_supplied_flat"):
        params["flat_field"]["override_flat"] = params["flat_field"]["user_supplied_flat"]
    references = select_step_references(steps, params, status, params_crds, ctx,
                                        optional=("filteroffset", "area"))
    for step, reftype in (("assign_wcs", "distortion"), ("flat_field", "flat"), ("photom", "photom")):
        if status.get(step) == COMPLETE and references.get(reftype) == NOT_APPLICABLE:
            if step == "assign_wcs":
                raise ReferenceFileError("distortion", f"CRDS {ctx} gives N/A: no imaging WCS can be built")
            status[step], reasons[step] = SKIPPED, f"CRDS gives N/A for the {reftype} reference"
    return Image2Plan(steps, params, status, reasons, references, ctx, pipeline_params, sources)


# ---------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------

@dataclass
class Image2Result:
    """What a run wrote and measured."""

    products: dict[str, Path]
    status: dict[str, str]
    references: dict[str, str]
    context: str
    step_seconds: dict[str, float]
    seconds: float = 0.0


def _subarray(primary: Mapping[str, Any], shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(xstart, ystart, xsize, ysize), 1-based starts; full frame when keywords are absent."""
    ny, nx = shape
    return (int(primary.get("SUBSTRT1", 1)), int(primary.get("SUBSTRT2", 1)),
            int(primary.get("SUBSIZE1", nx)), int(primary.get("SUBSIZE2", ny)))


def read_reference_window(path: str, reftype: str, names: tuple[str, ...], xstart: int, ystart: int,
                          nx: int, ny: int) -> list[np.ndarray]:
    """Extensions ``names`` of an image reference, cut to the science window (1-based starts).

    A reference of the science shape is taken as is; a larger one (full frame) is cut using its
    own SUBSTRT1/2 (default 1)."""
    try:
        with fits.open(path, memmap=False) as hdul:
            hdr = hdul[0].header
            out = []
            for name in names:
                hdu = hdul[name]
                rshape = hdu.shape
                if tuple(rshape) == (ny, nx) and int(hdr.get("SUBSTRT1", xstart)) == xstart \
                        and int(hdr.get("SUBSTRT2", ystart)) == ystart:
                    out.append(np.array(hdu.data))
                    continue
                x0 = xstart - int(hdr.get("SUBSTRT1", 1))
                y0 = ystart - int(hdr.get("SUBSTRT2", 1))
                if x0 < 0 or y0 < 0 or y0 + ny > rshape[-2] or x0 + nx > rshape[-1]:
                    raise ReferenceFileError(reftype, f"{name} {rshape} does not cover the science window "
                                                      f"x {xstart}..{xstart + nx - 1}, y {ystart}..{ystart + ny - 1}",
                                             path)
                out.append(np.array(hdu.section[y0:y0 + ny, x0:x0 + nx]))
            return out
    except ReferenceFileError:
        raise
    except Exception as exc:
        raise ReferenceFileError(reftype, f"cannot read ({exc})", path) from exc


def run_image2(source: RateSource, plan: Image2Plan, output_dir: str | Path) -> Image2Result:
    """Run the planned steps on ``source`` and write ``<name>_cal.fits`` into ``output_dir``."""
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    arrays = source.arrays
    ny, nx = arrays.sci.shape
    xstart, ystart, _, _ = _subarray(source.primary, (ny, nx))
    filt = str(source.primary.get("FILTER", "")).strip()
    pupil = str(source.primary.get("PUPIL", "")).strip()
    refs = plan.references
    wcs = sip = None
    extra: dict[str, Any] = {}

    t = time.perf_counter()
    if plan.runs("assign_wcs"):
        pointing = Pointing.from_header(source.sci_header, source.path)
        offset = read_filter_offset(refs.get("filteroffset"), filt, pupil)
        wcs = imaging_wcs(pointing, read_distortion(refs["distortion"]), xstart, ystart, nx, ny, offset)
        p = plan.params["assign_wcs"]
        if p["sip_approx"]:
            crpix = (source.sci_header.get("CRPIX1"), source.sci_header.get("CRPIX2"))
            try:
                sip = fits_sip_header(wcs, crpix, p["sip_max_pix_error"], p["sip_degree"],
                                      p["sip_max_inv_pix_error"], p["sip_inv_degree"], p["sip_npoints"])
            except (ValueError, RuntimeError) as exc:
                log.warning("SIP approximation failed", error=str(exc))
        extra["s_region"] = s_region(wcs)
    seconds["assign_wcs"] = time.perf_counter() - t

    t = time.perf_counter()
    if plan.runs("flat_field"):
        flat, flat_err, flat_dq = read_reference_window(refs["flat"], "flat", ("SCI", "ERR", "DQ"),
                                                        xstart, ystart, nx, ny)
        flat, flat_dq = prepare_flat(flat, flat_dq)
        apply_flat(arrays, flat, flat_err.astype(np.float32, copy=False), flat_dq)
    seconds["flat_field"] = time.perf_counter() - t

    t = time.perf_counter()
    area = None
    if plan.runs("photom"):
        extra.update(_photom(arrays, refs, filt, pupil, source, xstart, ystart, nx, ny, plan))
        area = extra.pop("area", None)
        if extra.get("conversion") is None:
            plan.status["photom"], plan.skip_reason["photom"] = SKIPPED, f"no photom row for {filt}/{pupil}"
    seconds["photom"] = time.perf_counter() - t

    t = time.perf_counter()
    out = product_path(output_dir, Path(source.path).name, "cal")
    _write_cal(source, plan, out, arrays, wcs, sip, area, extra)
    seconds["write"] = time.perf_counter() - t
    products = {"cal": out}
    if plan.runs("resample"):
        from .resample_step import resample_cal_file  # noqa: PLC0415

        t = time.perf_counter()
        products["i2d"] = resample_cal_file(out, product_path(output_dir, Path(source.path).name, "i2d"),
                                            plan.params["resample"])
        seconds["resample"] = time.perf_counter() - t
    total = time.perf_counter() - started
    log.info("image2 done", file=Path(source.path).name, seconds=round(total, 3))
    return Image2Result(products, dict(plan.status), dict(plan.references), plan.context, seconds, total)


def _photom(arrays: ImageArrays, refs: Mapping[str, str], filt: str, pupil: str, source: RateSource,
            xstart: int, ystart: int, nx: int, ny: int, plan: Image2Plan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    path = refs["photom"]
    try:
        with fits.open(path) as hdul:
            table = np.array(hdul["PHOTOM"].data)
            ph = hdul[0].header
            out["pixar_sr"], out["pixar_a2"] = ph.get("PIXAR_SR"), ph.get("PIXAR_A2")
            if any(n.upper().startswith("TIMECOEFF") for n in (h.name for h in hdul)):
                raise StepNotImplementedError(f"{path}: time-dependent photom corrections are not implemented")
    except (StepNotImplementedError, ReferenceFileError):
        raise
    except Exception as exc:
        raise ReferenceFileError("photom", f"cannot read the PHOTOM table ({exc})", path) from exc
    area_path = refs.get("area", NOT_APPLICABLE)
    if area_path != NOT_APPLICABLE:
        (area,) = read_reference_window(area_path, "area", ("SCI",), xstart, ystart, nx, ny)
        out["area"] = area.astype(np.float32, copy=False)
        ah = fits.getheader(area_path)
        if ah.get("PIXAR_SR") is not None and ah.get("PIXAR_A2") is not None:
            out["pixar_sr"], out["pixar_a2"] = ah["PIXAR_SR"], ah["PIXAR_A2"]
    sub = str(source.primary.get("SUBARRAY", "")).strip() or None
    conversion = photom_conversion(table, filt, pupil, sub)
    out["conversion"] = conversion
    if conversion is not None:
        apply_photom(arrays, conversion)
    return out


_CAL_STEP_ATTR = {"bkg_subtract": "bkg_subtract", "assign_wcs": "assign_wcs", "flat_field": "flat_field",
                  "photom": "photom", "resample": "resample"}


def _write_cal(source: RateSource, plan: Image2Plan, out: Path, arrays: ImageArrays, wcs: Any,
               sip: fits.Header | None, area: np.ndarray | None, extra: Mapping[str, Any]) -> None:
    """The cal product through stdatamodels' ImageModel (gwcs in the ASDF extension)."""
    import warnings  # noqa: PLC0415

    from stdatamodels.jwst.datamodels import ImageModel  # noqa: PLC0415

    from .products import software_version  # noqa: PLC0415

    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ImageModel(source.path)
    try:
        arrays.to_model(model)
        if area is not None:
            model.area = area
        meta = model.meta
        if wcs is not None:
            meta.wcs = wcs
            meta.wcsinfo.s_region = extra.get("s_region")
            if sip is not None:
                _set_wcsinfo(model, sip)
        for step, status in plan.status.items():
            setattr(meta.cal_step, _CAL_STEP_ATTR[step], status)
        for reftype, path in plan.references.items():
            setattr(getattr(meta.ref_file, reftype), "name", reference_uri(path))
        meta.ref_file.crds.context_used = plan.context
        meta.ref_file.crds.version = crds_version()
        if extra.get("conversion") is not None:
            c = extra["conversion"]
            meta.photometry.conversion_megajanskys = float(c)
            meta.photometry.conversion_microjanskys = float(c * MJSR_TO_UJA2)
            meta.bunit_data = meta.bunit_err = "MJy/sr"
        if extra.get("pixar_sr") is not None:
            meta.photometry.pixelarea_steradians = float(extra["pixar_sr"])
        if extra.get("pixar_a2") is not None:
            meta.photometry.pixelarea_arcsecsq = float(extra["pixar_a2"])
        meta.filename = out.name
        meta.calibration_software_name = "calstream"
        meta.calibration_software_version = software_version()
        save_model(model, out)
    finally:
        model.close()


def _set_wcsinfo(model: Any, sip: fits.Header) -> None:
    """Replace the linear FITS WCS of meta.wcsinfo with the SIP approximation (CD matrix)."""
    info = model.meta.wcsinfo.instance
    for key in [k for k in info if k.startswith(("pc", "cdelt", "a_", "b_", "ap_", "bp_"))]:
        del info[key]
    for key, value in sip.items():
        k = key.lower()
        if k.startswith("naxis") or k in ("wcsaxes",) or k.startswith(("cdelt", "pc")):
            continue
        info[k] = value


# ---------------------------------------------------------------------------------------------
# One call for callers (CLI, daemon workers)
# ---------------------------------------------------------------------------------------------

def calibrate_rate_file(input_path: str | Path, output_dir: str | Path, *,
                        cli_steps: Mapping[str, Mapping[str, Any]] | None = None,
                        cli_pipeline: Mapping[str, Any] | None = None,
                        parameter_file: str | Path | None = None, context: str | None = None) -> Image2Result:
    """Open, plan, run and write: calwebb_image2 on one rate file."""
    source = open_rate(input_path)
    plan = plan_image2(source.primary, cli_steps=cli_steps, cli_pipeline=cli_pipeline,
                       parameter_file=parameter_file, context=context)
    for step, reason in plan.skip_reason.items():
        log.debug("step skipped", step=step, reason=reason)
    return run_image2(source, plan, output_dir)


__all__ = [
    "COMPLETE", "SKIPPED", "Image2Plan", "Image2Result", "ImageArrays", "Pointing", "RateSource",
    "apply_flat", "apply_photom", "calibrate_rate_file", "fits_sip_header", "flag_invalid", "imaging_wcs",
    "open_rate", "photom_conversion", "plan_image2", "prepare_flat", "read_distortion", "read_filter_offset",
    "read_reference_window", "run_image2", "s_region", "v2v3_to_sky_model", "velocity_aberration_model",
]
