"""calwebb_image3 for imaging: an association of cal images -> i2d mosaic, source catalog, crf files.

Steps in jwst's order: assign_mtwcs (moving targets only: not implemented, SKIPPED for fixed
targets), tweakreg (:mod:`.tweakreg`), skymatch (:mod:`.skymatch`), outlier_detection
(:mod:`.outlier`; writes ``<member>_<asn_id>_crf.fits``), resample (:mod:`.resample`; writes
``<product>_i2d.fits``), source_catalog (:mod:`.catalog`; ``<product>_cat.ecsv`` and
``<product>_segm.fits``).

Memory is bounded by one exposure plus the mosaic-sized arrays, whatever the number of exposures:
only metadata and gwcs objects are kept per member; every pass re-reads one member's arrays; the
per-exposure resampled images of outlier detection and the pixel maps go to temporary files.
Parameters use jwst's names and defaults (:data:`calstream.steps.parameters.IMAGE3`), layered as in
the other pipelines (defaults < CRDS ``pars-*`` (optional) < parameter file < command line).
"""

from __future__ import annotations

import functools
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import structlog

from . import outlier as od
from .asn import Association, load_association
from .calimage import CalInfo, read_cal_arrays, read_cal_info, resample_input, write_image_like
from .crdsrefs import context_name, crds_version
from .errors import InputError, ParameterError, StepNotImplementedError
from .exposure import crds_parameters
from .image2 import ImageArrays, flag_invalid, s_region
from .parameters import IMAGE3
from .planning import resolve_parameters
from .products import software_version
from .resample import Mosaic, OutputGrid, PixmapCache, ResampleInput, blot
from .resample_step import UNSUPPORTED as RESAMPLE_UNSUPPORTED
from .resample_step import check_parameters, grid_from_parameters, parameter_pair, resample_all, write_i2d
from .skymatch import SkyStats, bounding_polygon, measure_image, read_skylist, sky_mask, solve_sky

log = structlog.get_logger("calstream.steps.image3")

COMPLETE, SKIPPED = "COMPLETE", "SKIPPED"
PIPELINE = "calwebb_image3"
IMAGING_EXP_TYPES = ("NRC_IMAGE", "MIR_IMAGE", "NRS_IMAGE", "NIS_IMAGE", "FGS_IMAGE")
#: keywords that must agree between the members of one mosaic
CONSISTENT_KEYWORDS = ("INSTRUME", "FILTER", "PUPIL")
STEP_ORDER = ("assign_mtwcs", "tweakreg", "skymatch", "outlier_detection", "resample", "source_catalog")


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

@dataclass
class Member:
    """One exposure's state through the pipeline (no pixel arrays are kept)."""

    info: CalInfo
    wcs: Any
    source: Path                                  # where its arrays are read from (cal, then crf)
    sky_level: float | None = None
    sky_subtracted: bool = False
    subtract_pending: bool = False                # level still to subtract from the stored SCI
    status: dict[str, str] = field(default_factory=dict)
    tweak: dict[str, Any] = field(default_factory=dict)
    n_outliers: int = 0

    def arrays(self, err: bool = True) -> ImageArrays:
        """This exposure's arrays as the pipeline currently sees them (sky applied, NaNs matched);
        ``err=False`` skips ERR (drizzling does not use it)."""
        arrays = read_cal_arrays(self.source, self.info.shape, err=err)
        if self.subtract_pending and self.sky_level is not None:
            arrays.sci -= self.sky_level
        flag_invalid(arrays)
        return arrays

    def resample_input(self, arrays: ImageArrays) -> ResampleInput:
        """The arrays with this member's current WCS and sky level, ready to drizzle."""
        image = resample_input(self.info, arrays, self.wcs)
        image.sky_level, image.sky_subtracted = self.sky_level, self.sky_subtracted
        return image


def open_members(asn: Association) -> list[Member]:
    """The association's science members, validated: files exist, are imaging cal products with a
    gwcs, and share instrument, filter and pupil. InputError names the file and the problem."""
    science = asn.science()
    where = asn.path
    if not science:
        raise InputError(where, "association has no science members")
    members: list[Member] = []
    paths = [p for p, m in zip(asn.member_paths(), asn.members) if m in science]
    for path in paths:
        if not path.is_file():
            raise InputError(path, f"association member does not exist (listed in {where})")
        info = read_cal_info(path)
        exp_type = info.keyword("EXP_TYPE")
        if exp_type not in IMAGING_EXP_TYPES:
            raise StepNotImplementedError(f"{path}: calwebb_image3 for EXP_TYPE={exp_type or '?'} is not implemented "
                                          f"(imaging only: {', '.join(IMAGING_EXP_TYPES)})")
        members.append(Member(info, info.wcs, path, info.sky_level, bool(info.sky_subtracted)))
    first = members[0].info
    for m in members[1:]:
        for key in CONSISTENT_KEYWORDS:
            if m.info.keyword(key) != first.keyword(key):
                raise InputError(m.info.path, f"{key}={m.info.keyword(key) or '?'} differs from "
                                              f"{first.keyword(key) or '?'} of {first.name}: one mosaic needs "
                                              f"members of one instrument and filter")
    return members


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------

@dataclass
class Image3Plan:
    """Parameters and step statuses decided before any pixel is read."""

    params: dict[str, dict[str, Any]]
    status: dict[str, str]
    skip_reason: dict[str, str]
    context: str
    pipeline_params: dict[str, Any] = field(default_factory=dict)
    parameter_sources: list[str] = field(default_factory=list)

    def runs(self, step: str) -> bool:
        return self.status.get(step) == COMPLETE


#: parameters calstream accepts but cannot act on: any value other than jwst's default is refused
_UNSUPPORTED: dict[str, tuple[str, ...]] = {
    "tweakreg": ("use_custom_catalogs", "catfile", "save_catalogs", "save_abs_catalog", "nlevels", "contrast",
                 "multithresh_mode", "localbkg_width", "apermask_method", "kron_params"),
    "outlier_detection": ("resample_data", "save_intermediate_results", "pixmap_stepsize"),
    "resample": tuple(RESAMPLE_UNSUPPORTED),
    "source_catalog": ("starfinder", "multithresh_mode", "localbkg_width", "apermask_method", "kron_params"),
}


def plan_image3(members: Sequence[Member], *, cli_steps: Mapping[str, Mapping[str, Any]] | None = None,
                cli_pipeline: Mapping[str, Any] | None = None, parameter_file: str | Path | None = None,
                context: str | None = None) -> Image3Plan:
    """Resolve parameters and decide which steps run (StepNotImplementedError for what cannot)."""
    ctx = context_name(context)
    params, pipeline_params, sources = resolve_parameters(IMAGE3, PIPELINE, crds_parameters(members[0].info.primary),
                                                          ctx, parameter_file, cli_steps, cli_pipeline)
    defaults = {s.name: s.all_defaults() for s in IMAGE3}
    status, reasons = {}, {}
    for name in STEP_ORDER:
        if params[name]["skip"]:
            status[name], reasons[name] = SKIPPED, "skip=True"
            continue
        for key in _UNSUPPORTED.get(name, ()):
            if params[name][key] != defaults[name][key]:
                raise StepNotImplementedError(f"steps.{name}.{key}={params[name][key]!r} is not implemented in "
                                              f"calstream (only jwst's default {defaults[name][key]!r})")
        status[name] = COMPLETE
    if status["assign_mtwcs"] == COMPLETE:
        if any(m.info.keyword("TARGTYPE") == "MOVING" for m in members):
            raise StepNotImplementedError("moving-target mosaics (assign_mtwcs) are not implemented in calstream")
        status["assign_mtwcs"], reasons["assign_mtwcs"] = SKIPPED, "fixed target (jwst runs tweakreg instead)"
    for name in ("outlier_detection", "resample"):
        if status[name] == COMPLETE:
            check_parameters(params[name], name)
    if status["outlier_detection"] == COMPLETE and len(members) < 2:
        status["outlier_detection"], reasons["outlier_detection"] = SKIPPED, "needs at least two exposures"
    if status["source_catalog"] == COMPLETE and status["resample"] != COMPLETE:
        status["source_catalog"], reasons["source_catalog"] = SKIPPED, "no resampled image"
    if status["source_catalog"] == COMPLETE and not params["resample"]["enable_err"]:
        status["source_catalog"], reasons["source_catalog"] = SKIPPED, "resample.enable_err=False: no ERR"
    return Image3Plan(params, status, reasons, ctx, pipeline_params, sources)


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------

_DETECT_KEYS = ("snr_threshold", "kernel_fwhm", "bkg_boxsize", "starfinder", "sigma_radius", "minsep_fwhm",
                "sharplo", "sharphi", "roundlo", "roundhi", "brightest", "peakmax", "npixels", "connectivity",
                "deblend")
_ALIGN_KEYS = ("searchrad", "separation", "use2dhist", "tolerance", "xoffset", "yoffset", "enforce_user_order",
               "expand_refcat", "minobj", "fitgeometry", "nclip", "sigma", "abs_searchrad", "abs_separation",
               "abs_use2dhist", "abs_tolerance", "abs_minobj", "abs_fitgeometry", "abs_nclip", "abs_sigma")
_ONLINE_REFCATS = ("GAIAREFCAT", "GAIADR3", "GAIADR2", "GAIADR1")


def run_tweakreg(members: Sequence[Member], p: Mapping[str, Any]) -> str:
    """Detect sources in every exposure, align the WCSs; returns the step status."""
    from .tweakreg import align_wcs, detect_sources  # noqa: PLC0415

    catalogs = []
    for m in members:
        arrays = m.arrays()
        catalogs.append(detect_sources(arrays.sci, arrays.err, arrays.dq, **{k: p[k] for k in _DETECT_KEYS}))
        del arrays
    alignments = align_wcs([m.wcs for m in members], catalogs, group_ids=[m.info.group_id for m in members],
                           names=[m.info.name for m in members], abs_refcat=_abs_refcat(p["abs_refcat"]),
                           **{k: p[k] for k in _ALIGN_KEYS})
    aligned = any(a.status == "SUCCESS" for a in alignments)
    for m, cat, a in zip(members, catalogs, alignments):
        done = a.status == "SUCCESS" or (aligned and a.status == "REFERENCE")
        m.status["tweakreg"] = COMPLETE if done else SKIPPED
        m.tweak = {"status": a.status, "shift_arcsec": a.shift_arcsec, "rotation_deg": a.rotation_deg,
                   "rms_arcsec": a.rms_arcsec, "n_matches": a.n_matches, "n_sources": len(cat)}
        if a.status == "SUCCESS":
            m.wcs = a.wcs
        log.info("tweakreg", file=m.info.name, status=a.status, n_sources=len(cat), shift=a.shift_arcsec,
                 rms=round(a.rms_arcsec, 4))
    return COMPLETE if aligned else SKIPPED


def _abs_refcat(value: Any) -> Any:
    if value is None or str(value).strip().lower() in ("", "none"):
        return None
    if str(value).strip().upper() in _ONLINE_REFCATS:
        raise StepNotImplementedError(f"abs_refcat={value}: online astrometric catalogs are not reachable; "
                                      "give a catalog file (RA/DEC columns)")
    from astropy.table import Table  # noqa: PLC0415

    path = Path(str(value))
    if not path.is_file():
        raise ParameterError(f"steps.tweakreg.abs_refcat: {path} does not exist")
    try:
        return Table.read(path)
    except Exception as exc:  # astropy raises many kinds for an unreadable table
        raise ParameterError(f"steps.tweakreg.abs_refcat: cannot read {path} ({exc})") from exc


def run_skymatch(members: Sequence[Member], p: Mapping[str, Any]) -> str:
    """Measure the sky of every exposure (one read each) and record the levels."""
    for m in members:
        if m.info.sky_level is not None or m.info.sky_subtracted is not None:
            raise StepNotImplementedError(f"{m.info.name}: skymatch on images that already carry a background "
                                          "level (skymatch run before) is not implemented in calstream")
    if p["skymethod"] == "user":
        if not p["skylist"]:
            raise ParameterError("skymethod='user' needs steps.skymatch.skylist")
        try:
            levels = read_skylist(p["skylist"], [m.info.name for m in members])
        except (OSError, ValueError) as exc:
            raise ParameterError(f"steps.skymatch.skylist: {exc}") from exc
        valid = [True] * len(members)
    else:
        levels, valid = _match_sky(members, p)
    for m, level, ok in zip(members, levels, valid):
        m.status["skymatch"] = COMPLETE if ok else SKIPPED
        if ok:
            m.sky_level, m.sky_subtracted = float(level), bool(p["subtract"])
            m.subtract_pending = m.sky_subtracted
        log.info("skymatch", file=m.info.name, level=m.sky_level, status=m.status["skymatch"])
    return COMPLETE if any(valid) else SKIPPED


def _match_sky(members: Sequence[Member], p: Mapping[str, Any]) -> tuple[list[float], list[bool]]:
    stats = SkyStats(p["skystat"], p["lower"], p["upper"], p["nclip"], p["lsigma"], p["usigma"], p["binwidth"])
    group_index: dict[str, int] = {}
    groups = [group_index.setdefault(m.info.group_id, len(group_index)) for m in members]
    polygons = [bounding_polygon(m.wcs, m.info.shape, p["stepsize"]) for m in members]
    measurements = []
    matching = "match" in p["skymethod"]            # "local" and "global" need no overlaps
    for i, m in enumerate(members):
        others: dict[int, list] = {}
        for j, poly in enumerate(polygons if matching else ()):
            if groups[j] != groups[i]:
                others.setdefault(groups[j], []).append(poly)
        arrays = m.arrays(err=False)
        good = sky_mask(arrays.sci, arrays.dq, p["dqbits"])
        measurements.append(measure_image(arrays.sci, good, m.wcs, others, stats,
                                          whole_image=p["skymethod"] != "match"))
        del arrays, good
    solution = solve_sky(measurements, skymethod=p["skymethod"], match_down=p["match_down"], groups=groups)
    return solution.levels, solution.valid


def grid_for(members: Sequence[Member], p: Mapping[str, Any] | None = None) -> OutputGrid:
    """The output grid over the members' (tweaked) footprints; ``p`` holds resample's WCS parameters."""
    first = members[0]
    return grid_from_parameters([m.wcs for m in members], first.info.reference, first.info.shape, p)


def group_indices(members: Sequence[Member]) -> list[list[int]]:
    """Member indices per exposure group, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(members):
        groups.setdefault(m.info.group_id, []).append(i)
    return list(groups.values())


def run_outlier_detection(members: Sequence[Member], p: Mapping[str, Any], output_dir: Path, asn_id: str,
                          update_crf: Callable[[Any, Member], None], pixmaps: PixmapCache) -> list[Path]:
    """Single-drizzle each group, median (images in a temporary file), blot, flag; write one crf per member."""
    snr = parameter_pair(p["snr"], "snr", float, "outlier_detection")
    scale = parameter_pair(p["scale"], "scale", float, "outlier_detection")
    grid = grid_for(members)
    groups = group_indices(members)

    def pixmap(i: int) -> np.ndarray:
        return pixmaps.get(str(i), members[i].wcs, grid, members[i].info.shape)

    with od.MedianStack(len(groups), grid.shape, directory=output_dir) as stack:
        for gi, indices in enumerate(groups):
            images = (drizzle_input(members, i, grid, p["weight_type"], pixmaps) for i in indices)
            sci, wht = od.single_drizzle(images, grid, n_inputs=len(indices), pixfrac=p["pixfrac"],
                                         kernel=p["kernel"], fillval=p["fillval"], weight_type=p["weight_type"],
                                         good_bits=p["good_bits"])
            stack.set(gi, od.mask_low_weight(sci, wht, p["maskpt"]))
            del sci, wht
        median = stack.median()
    crfs = []
    for i, m in enumerate(members):
        arrays = m.arrays()
        blotted = blot(median, grid.wcs, m.wcs, m.info.shape, pixmap=pixmap(i))
        backg = m.sky_level if (not m.sky_subtracted and m.sky_level is not None) else p["backg"]
        mask = od.flag_outliers(arrays.sci, arrays.err, blotted, snr=snr, scale=scale, backg=backg)
        del blotted
        m.n_outliers = od.apply_outlier_flags(arrays.dq, mask)
        flag_invalid(arrays)
        m.status["outlier_detection"] = COMPLETE
        out = output_dir / crf_name(m.info.name, asn_id)
        write_image_like(m.source, out, arrays, lambda model, member=m: update_crf(model, member))
        m.source, m.subtract_pending = out, False
        crfs.append(out)
        log.info("outlier_detection", file=m.info.name, flagged=m.n_outliers)
    return crfs


def crf_name(member_name: str, asn_id: str) -> str:
    """``jw..._nrca1_cal.fits`` -> ``jw..._nrca1_<asn_id>_crf.fits`` (jwst's naming)."""
    stem = member_name[:-5] if member_name.endswith(".fits") else member_name
    base, _, last = stem.rpartition("_")
    if base and last in ("cal", "crf", "i2d", "rate"):
        stem = base
    return f"{stem}_{asn_id}_crf.fits" if asn_id else f"{stem}_crf.fits"


def run_resample(members: Sequence[Member], p: Mapping[str, Any], pixmaps: PixmapCache) -> Mosaic:
    """Drizzle every member onto the output grid, one exposure in memory at a time."""
    grid = grid_for(members, p)
    images = (drizzle_input(members, i, grid, p["weight_type"], pixmaps) for i in range(len(members)))
    return resample_all(images, grid, len(members), p)


def drizzle_input(members: Sequence[Member], i: int, grid: OutputGrid, weight_type: str | None,
                  pixmaps: PixmapCache) -> tuple[ResampleInput, np.ndarray]:
    """Member ``i`` as it drizzles onto ``grid``: its arrays now, its pixel map and weighting
    variance as first computed in this run (outlier detection and resample share them)."""
    m = members[i]
    image = m.resample_input(m.arrays(err=False))
    image.weighting_var = pixmaps.weighting_variance(str(i), image.var_rnoise, weight_type)
    return image, pixmaps.get(str(i), m.wcs, grid, m.info.shape)


# ---------------------------------------------------------------------------------------------
# Products
# ---------------------------------------------------------------------------------------------

#: per-input columns of the i2d's HDRTAB (the list of inputs)
HDRTAB_KEYWORDS = ("FILENAME", "DETECTOR", "FILTER", "PUPIL", "EXPSTART", "EFFEXPTM", "BKGLEVEL", "S_TWKREG",
                   "S_SKYMAT", "S_OUTLIR")


def input_table(members: Sequence[Member]) -> np.ndarray:
    """Structured array, one row per input: file name, detector, filter, timing, sky, statuses."""
    rows = []
    for m in members:
        t = m.info.times
        rows.append((m.source.name, m.info.keyword("DETECTOR"), m.info.keyword("FILTER"), m.info.keyword("PUPIL"),
                     np.nan if t.start_time is None else t.start_time, t.exposure_time,
                     np.nan if m.sky_level is None else m.sky_level, m.status.get("tweakreg", SKIPPED),
                     m.status.get("skymatch", SKIPPED), m.status.get("outlier_detection", SKIPPED)))
    width = max(8, max(len(r[0]) for r in rows))
    dtype = [("FILENAME", f"S{width}"), ("DETECTOR", "S16"), ("FILTER", "S16"), ("PUPIL", "S16"), ("EXPSTART", "f8"),
             ("EFFEXPTM", "f8"), ("BKGLEVEL", "f8"), ("S_TWKREG", "S8"), ("S_SKYMAT", "S8"), ("S_OUTLIR", "S8")]
    return np.array(rows, dtype=dtype)


def _attach_input_table(model: Any, table: np.ndarray) -> None:
    from astropy.io import fits  # noqa: PLC0415
    from stdatamodels import fits_support  # noqa: PLC0415

    schema = {"title": "Combined header table", "fits_hdu": "HDRTAB",
              "datatype": [{"name": n, "datatype": ["ascii", table.dtype[n].itemsize] if table.dtype[n].kind == "S"
                            else str(table.dtype[n])} for n in table.dtype.names]}
    model.add_schema_entry("hdrtab", schema)
    model.hdrtab = fits_support.from_fits_hdu(fits.BinTableHDU(table), schema)


def set_provenance(model: Any, plan: Image3Plan, status: Mapping[str, str]) -> None:
    """calstream version, CRDS context and S_<step> statuses in a product's metadata."""
    meta = model.meta
    meta.calibration_software_name = "calstream"
    meta.calibration_software_version = software_version()
    meta.ref_file.crds.context_used = plan.context
    meta.ref_file.crds.version = crds_version()
    for step in STEP_ORDER:
        if step in status and step != "source_catalog":
            setattr(meta.cal_step, step, status[step])


def write_mosaic(mosaic: Mosaic, members: Sequence[Member], plan: Image3Plan, status: Mapping[str, str],
                 out: Path, asn: Association, p: Mapping[str, Any]) -> Any:
    """The i2d product (ImageModel; gwcs in the ASDF extension). Returns the model (open)."""
    def provenance(model: Any) -> None:
        model.meta.asn.table_name = asn.path.name if asn.path else None
        model.meta.asn.pool_name = asn.asn_id or None
        set_provenance(model, plan, status)
        _attach_input_table(model, input_table(members))

    return write_i2d(mosaic, members[0].source, out, p, provenance)


def _update_crf(plan: Image3Plan, sip_params: Mapping[str, Any]) -> Callable[[Any, Member], None]:
    """Metadata of a crf product: tweaked gwcs (+ SIP), sky level, per-exposure step statuses."""
    from .image2 import _set_wcsinfo, fits_sip_header  # noqa: PLC0415

    def update(model: Any, member: Member) -> None:
        meta = model.meta
        if member.wcs is not member.info.wcs:
            meta.wcs = member.wcs
            meta.wcsinfo.s_region = s_region(member.wcs)
            if sip_params.get("sip_approx"):
                try:
                    crpix = (meta.wcsinfo.crpix1, meta.wcsinfo.crpix2)
                    _set_wcsinfo(model, fits_sip_header(member.wcs, crpix, sip_params["sip_max_pix_error"],
                                                        sip_params["sip_degree"], sip_params["sip_max_inv_pix_error"],
                                                        sip_params["sip_inv_degree"], sip_params["sip_npoints"]))
                except (ValueError, RuntimeError) as exc:
                    log.warning("SIP approximation of the tweaked WCS failed", file=member.info.name, error=str(exc))
        if member.sky_level is not None and member.status.get("skymatch") == COMPLETE:
            meta.background.level = member.sky_level
            meta.background.subtracted = member.sky_subtracted
            meta.background.method = plan.params["skymatch"]["skymethod"]
        for step in ("tweakreg", "skymatch", "outlier_detection"):
            if step in member.status:
                setattr(meta.cal_step, step, member.status[step])
        meta.calibration_software_name = "calstream"
        meta.calibration_software_version = software_version()
        meta.ref_file.crds.context_used = plan.context

    return update


# ---------------------------------------------------------------------------------------------
# One call for callers (CLI, daemon workers)
# ---------------------------------------------------------------------------------------------

@dataclass
class Image3Result:
    """What a run wrote and measured. ``products``: kind -> path ("i2d", "cat", "segm", one
    "crf:<file name>" per member)."""

    products: dict[str, Path]
    status: dict[str, str]
    context: str
    step_seconds: dict[str, float]
    seconds: float = 0.0
    members: list[dict[str, Any]] = field(default_factory=list)


def run_image3(asn: Association, members: Sequence[Member], plan: Image3Plan, output_dir: str | Path) -> Image3Result:
    """Execute a plan: every step in jwst's order, products into ``output_dir``."""
    started = time.perf_counter()
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    status = dict(plan.status)
    seconds: dict[str, float] = {}
    products: dict[str, Path] = {}
    params = plan.params

    def timed(step: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        try:
            return fn()
        finally:
            seconds[step] = time.perf_counter() - t
            release_free_memory()

    if plan.runs("tweakreg"):
        status["tweakreg"] = timed("tweakreg", lambda: run_tweakreg(members, params["tweakreg"]))
    if plan.runs("skymatch"):
        status["skymatch"] = timed("skymatch", lambda: run_skymatch(members, params["skymatch"]))
    model = None
    pixmaps = PixmapCache(out_dir)
    try:
        if plan.runs("outlier_detection"):
            crfs = timed("outlier_detection", lambda: run_outlier_detection(
                members, params["outlier_detection"], out_dir, asn.asn_id, _update_crf(plan, params["tweakreg"]),
                pixmaps))
            products.update({f"crf:{p.name}": p for p in crfs})
        if plan.runs("resample"):
            mosaic = timed("resample", lambda: run_resample(members, params["resample"], pixmaps))
            pixmaps.close()
            i2d = out_dir / f"{asn.product_name}_i2d.fits"
            model = timed("write_i2d", lambda: _primary_only(write_mosaic(mosaic, members, plan, status, i2d, asn,
                                                                          params["resample"])))
            mosaic.variances.clear()    # the catalog needs SCI, ERR and WHT only
            mosaic.con = None
            release_free_memory()
            products["i2d"] = i2d
        if plan.runs("source_catalog"):
            products.update(timed("source_catalog", lambda: _catalog(mosaic, model, asn, out_dir,
                                                                     params["source_catalog"])))
    finally:
        pixmaps.close()
        if model is not None:
            model.close()
    total = time.perf_counter() - started
    log.info("image3 done", product=asn.product_name, members=len(members), seconds=round(total, 3))
    return Image3Result(products, status, plan.context, seconds, total, [_summary(m) for m in members])


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``; no-op elsewhere).

    Each step frees hundreds of MB of image-sized arrays (datamodels only once the cycle collector
    runs); glibc keeps much of it in the heap (its mmap threshold grows with large frees), so
    without this the next step's peak stacks on memory nobody uses."""
    gc.collect()          # datamodels keep their arrays in reference cycles
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    import ctypes  # noqa: PLC0415
    import ctypes.util  # noqa: PLC0415

    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def _primary_only(model: Any) -> Any:
    """A metadata-only copy (PRIMARY keywords) of a written product; the product model is closed."""
    from stdatamodels.jwst.datamodels import ImageModel  # noqa: PLC0415

    meta = ImageModel(None)
    meta.update(model, only="PRIMARY")
    model.close()
    return meta


def _catalog(mosaic: Mosaic, model: Any, asn: Association, out_dir: Path, p: Mapping[str, Any]) -> dict[str, Path]:
    from .catalog import measure_sources, write_catalog, write_segmentation  # noqa: PLC0415

    table, segm = measure_sources(
        mosaic.sci, mosaic.err, mosaic.wht, mosaic.grid.wcs, pixar_sr=mosaic.grid.pixelarea_steradians,
        snr_threshold=p["snr_threshold"], npixels=p["npixels"], kernel_fwhm=p["kernel_fwhm"],
        bkg_boxsize=p["bkg_boxsize"], deblend=p["deblend"], connectivity=p["connectivity"], nlevels=p["nlevels"],
        contrast=p["contrast"], aperture_ee=(p["aperture_ee1"], p["aperture_ee2"], p["aperture_ee3"]),
        ci1_star_threshold=p["ci1_star_threshold"], ci2_star_threshold=p["ci2_star_threshold"])
    cat = write_catalog(table, out_dir / f"{asn.product_name}_cat.ecsv")
    segm_path = write_segmentation(segm, mosaic.grid.wcs, out_dir / f"{asn.product_name}_segm.fits", meta_from=model)
    log.info("source_catalog", sources=len(table))
    return {"cat": cat, "segm": segm_path}


def _summary(m: Member) -> dict[str, Any]:
    return {"file": m.info.name, "product": m.source.name, "sky_level": m.sky_level, "outliers": m.n_outliers,
            "status": dict(m.status), **{f"tweak_{k}": v for k, v in m.tweak.items()}}


def calibrate_association(asn_path: str | Path, output_dir: str | Path, *,
                          cli_steps: Mapping[str, Mapping[str, Any]] | None = None,
                          cli_pipeline: Mapping[str, Any] | None = None, parameter_file: str | Path | None = None,
                          context: str | None = None) -> Image3Result:
    """Open, validate, plan, run and write: calwebb_image3 on one level-3 association file."""
    asn = load_association(asn_path)
    members = open_members(asn)
    plan = plan_image3(members, cli_steps=cli_steps, cli_pipeline=cli_pipeline, parameter_file=parameter_file,
                       context=context)
    for step, reason in plan.skip_reason.items():
        log.info("step skipped", step=step, reason=reason)
    return run_image3(asn, members, plan, output_dir)


__all__ = [
    "COMPLETE", "IMAGING_EXP_TYPES", "Image3Plan", "Image3Result", "Member", "SKIPPED", "calibrate_association",
    "crf_name", "grid_for", "group_indices", "input_table", "open_members", "plan_image3", "run_image3",
    "run_outlier_detection", "run_resample", "run_skymatch", "run_tweakreg", "write_mosaic",
]
