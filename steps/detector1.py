"""calwebb_detector1 for near-IR detectors, streamed in row chunks.

The exposure is never held whole as float32: each block of rows (plus halo rows for the spatial
steps) is read from the file, run through every step, and fitted; only the rate/rateints arrays
are full-frame. Reference-pixel corrections, which need the whole frame's border pixels, are
measured in a first light pass over the file.

Module layout: :func:`plan_detector1` decides what runs (parameters, references, statuses);
:func:`run_detector1` executes a plan on an input file and writes the products.
"""

from __future__ import annotations

import functools
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import structlog

from . import dqflags
from .crdsrefs import NOT_APPLICABLE, context_name, crds_version, reference_uri
from .errors import InputError, ParameterError, StepNotImplementedError
from .exposure import NEAR_IR, Exposure, crds_parameters, exposure_from_header
from .fitsio import RowReader, image_layout, open_header
from .parameters import DETECTOR1_NIR, NOT_IMPLEMENTED, StepSpec
from .planning import resolve_parameters, select_step_references
from .products import Provenance, carried_sci_cards, product_path, write_ramp, write_rate
from .references import Reference, open_reference

log = structlog.get_logger("calstream.steps.detector1")

COMPLETE, SKIPPED = "COMPLETE", "SKIPPED"
DEFAULT_CHUNK_ROWS = 128
#: steps that run before refpix and therefore feed its first pass
_PRE_REFPIX = ("group_scale", "dq_init", "saturation", "ipc", "superbias")


# ---------------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------------

@dataclass
class RampSource:
    """An uncal (uint16 SCI) or ramp product (float32 SCI + PIXELDQ + GROUPDQ) read by rows."""

    path: str
    exposure: Exposure
    kind: str                 # "uncal" | "ramp"
    sci: RowReader
    pixeldq: RowReader | None = None
    groupdq: RowReader | None = None
    sci_cards: Any = None     # pointing/WCS cards of the SCI header, carried to the products

    @property
    def shape(self) -> tuple[int, int, int, int]:
        e = self.exposure
        return e.nints, e.ngroups, e.subsize2, e.subsize1

    def read(self, y0: int, y1: int, x0: int = 0, x1: int | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows [y0, y1), columns [x0, x1): data float32 (nints, ngroups, h, w) DN, gdq uint8,
        pdq uint32 (h, w)."""
        x1 = self.shape[3] if x1 is None else x1
        data = self.sci.read(y0, y1, dtype=np.float32, x0=x0, x1=x1)
        if self.groupdq is not None:
            gdq = self.groupdq.read(y0, y1, dtype=np.uint8, x0=x0, x1=x1)
        else:
            gdq = np.zeros(data.shape, dtype=np.uint8)
        if self.pixeldq is not None:
            pdq = self.pixeldq.read(y0, y1, dtype=np.uint32, x0=x0, x1=x1)
        else:
            pdq = np.zeros((y1 - y0, x1 - x0), dtype=np.uint32)
        return data, gdq, pdq

    def close(self) -> None:
        for reader in (self.sci, self.pixeldq, self.groupdq):
            if reader is not None:
                reader.close()


def open_ramp_source(path: str | Path) -> RampSource:
    """Open and validate an uncal or ramp file; InputError names the file and the problem."""
    path = str(path)
    hdul = open_header(path)
    try:
        names = [h.name for h in hdul]
    except Exception as exc:  # astropy raises OSError/ValueError/... for damaged HDU lists
        raise InputError(path, f"damaged FITS structure ({exc})") from exc
    if "SCI" not in names:
        raise InputError(path, "no SCI extension: not a JWST exposure")
    sci = image_layout(hdul, "SCI", path)
    exposure = exposure_from_header(hdul[0].header, path, sci.shape)
    if "GROUPDQ" in names:
        kind = "ramp"
        pdq = RowReader(image_layout(hdul, "PIXELDQ", path)) if "PIXELDQ" in names else None
        gdq = RowReader(image_layout(hdul, "GROUPDQ", path))
    else:
        kind, pdq, gdq = "uncal", None, None
        if sci.native_dtype.kind not in "ui":
            raise InputError(path, f"uncal SCI must hold integer DN (uint16), found {sci.native_dtype}")
    sci_cards = carried_sci_cards(hdul["SCI"].header)
    hdul.close()
    return RampSource(path, exposure, kind, RowReader(sci), pdq, gdq, sci_cards)


# ---------------------------------------------------------------------------------------------
# Planning: parameters, statuses, references
# ---------------------------------------------------------------------------------------------

@dataclass
class Detector1Plan:
    """Everything decided before any pixel is touched."""

    exposure: Exposure
    steps: tuple[StepSpec, ...]
    params: dict[str, dict[str, Any]]
    status: dict[str, str]            # step -> COMPLETE (will run) | SKIPPED
    skip_reason: dict[str, str]
    references: dict[str, str]        # reftype -> local path | N/A
    context: str
    pipeline: str | None              # "calwebb_detector1", or None for a single step
    pipeline_params: dict[str, Any] = field(default_factory=dict)
    parameter_sources: list[str] = field(default_factory=list)

    def runs(self, step: str) -> bool:
        return self.status.get(step) == COMPLETE


def plan_detector1(exposure: Exposure, *, only_step: str | None = None,
                   cli_steps: Mapping[str, Mapping[str, Any]] | None = None,
                   cli_pipeline: Mapping[str, Any] | None = None,
                   parameter_file: str | Path | None = None, context: str | None = None) -> Detector1Plan:
    """Resolve parameters and references for ``exposure``.

    ``only_step`` plans a single-step run (``calstream run jump X_ramp.fits``).
    """
    if exposure.instrument not in NEAR_IR:
        raise StepNotImplementedError(
            f"{exposure.path}: calwebb_detector1 for {exposure.instrument} (MIRI-specific steps emicorr, "
            "rscd, firstframe, lastframe, reset) is not implemented in calstream yet")
    steps = DETECTOR1_NIR if only_step is None else tuple(s for s in DETECTOR1_NIR if s.name == only_step)
    if not steps:
        raise ParameterError(f"unknown step {only_step!r}; known: " + ", ".join(s.name for s in DETECTOR1_NIR))
    ctx = context_name(context)
    params_crds = crds_parameters(exposure.header)
    params, pipeline_params, sources = resolve_parameters(
        steps, "calwebb_detector1" if only_step is None else None, params_crds, ctx, parameter_file,
        cli_steps, cli_pipeline)
    status, reasons = _step_statuses(exposure, steps, params)
    references = select_step_references(steps, params, status, params_crds, ctx)
    if "ipc" in status and status["ipc"] == COMPLETE and references.get("ipc") == NOT_APPLICABLE:
        status["ipc"], reasons["ipc"] = SKIPPED, "CRDS gives N/A for the ipc reference"
    return Detector1Plan(exposure, steps, params, status, reasons, references, ctx,
                         "calwebb_detector1" if only_step is None else None, pipeline_params, sources)


def _step_statuses(exposure: Exposure, steps: tuple[StepSpec, ...],
                   params: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, str], dict[str, str]]:
    status: dict[str, str] = {}
    reasons: dict[str, str] = {}
    for spec in steps:
        if params[spec.name]["skip"]:
            status[spec.name], reasons[spec.name] = SKIPPED, "skip=True"
            continue
        if spec.name in NOT_IMPLEMENTED:
            raise StepNotImplementedError(f"step {spec.name} was requested (skip=False) but "
                                          f"{NOT_IMPLEMENTED[spec.name]}; set steps.{spec.name}.skip=true")
        status[spec.name] = COMPLETE
    if status.get("group_scale") == COMPLETE and exposure.frmdivsr == exposure.nframes:
        status["group_scale"], reasons["group_scale"] = SKIPPED, "FRMDIVSR equals NFRAMES"
    if status.get("gain_scale") == COMPLETE and exposure.gainfact is None:
        status["gain_scale"], reasons["gain_scale"] = SKIPPED, "no GAINFACT keyword"
    return status, reasons


# ---------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------

@dataclass
class Detector1Result:
    """What a run wrote and measured."""

    products: dict[str, Path]                       # product kind -> path
    status: dict[str, str]
    references: dict[str, str]
    context: str
    step_seconds: dict[str, float]
    seconds: float = 0.0


@dataclass
class _Chunk:
    """A block of rows with halo: rows [y0, y1), columns [x0, x1) of the frame; owned rows
    [own0, own1). References read for it are kept in ``refs`` so no step reads them twice."""

    y0: int
    y1: int
    own0: int
    own1: int
    data: np.ndarray
    gdq: np.ndarray
    pdq: np.ndarray
    x0: int = 0
    x1: int | None = None
    refs: dict[tuple[str, str, int | None], np.ndarray] = field(default_factory=dict)

    @property
    def owned(self) -> slice:
        return slice(self.own0 - self.y0, self.own1 - self.y0)

    @property
    def halo(self) -> tuple[int, int]:
        return self.own0 - self.y0, self.y1 - self.own1


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = func(*args, **kwargs)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return result


def halo_rows(plan: Detector1Plan, ipc_kernel_rows: int = 3) -> int:
    """Rows of context a chunk needs so that its owned rows come out as on the whole frame.

    The spatial reaches add up along the step chain: saturation growth (2n rows: its backward
    pass grows flags already grown), IPC (half the kernel), charge migration (1) and jump's
    neighbour flagging (1).
    """
    halo = 0
    if plan.runs("saturation"):
        halo += 2 * int(plan.params["saturation"]["n_pix_grow_sat"])
    if plan.runs("ipc"):
        halo += ipc_kernel_rows // 2
    if plan.runs("charge_migration"):
        halo += 1
    if plan.runs("jump"):
        halo += 1
    return halo


def chunk_bounds(ny: int, chunk_rows: int, halo: int) -> Iterator[tuple[int, int, int, int]]:
    """(y0, y1, own0, own1) for chunks of ``chunk_rows`` owned rows plus ``halo`` context rows."""
    for own0 in range(0, ny, chunk_rows):
        own1 = min(ny, own0 + chunk_rows)
        yield max(0, own0 - halo), min(ny, own1 + halo), own0, own1


def run_detector1(source: RampSource, plan: Detector1Plan, output_dir: str | Path,
                  chunk_rows: int = DEFAULT_CHUNK_ROWS, fsync: bool = True) -> Detector1Result:
    """Run the planned steps on ``source`` and write the products into ``output_dir``."""
    started = time.perf_counter()
    timer = _Timer()
    exp = plan.exposure
    with ExitStack() as stack:
        refs = _open_references(plan, exp, stack)
        runner = _ChunkRunner(plan, refs, timer)
        runner.average_dark = _average_dark_current(plan, refs, source)
        if plan.runs("refpix"):
            runner.refpix_plan = timer.run("refpix", _measure_refpix, source, runner, chunk_rows)
        result = runner.stream(source, chunk_rows)
    products = _write_products(source, plan, refs_uris(plan), runner, result, output_dir, fsync, timer)
    log.info("detector1 done", file=Path(source.path).name, seconds=round(time.perf_counter() - started, 3))
    return Detector1Result(products, dict(plan.status), dict(plan.references), plan.context,
                           timer.seconds, time.perf_counter() - started)


def refs_uris(plan: Detector1Plan) -> dict[str, str]:
    return {r: reference_uri(p) for r, p in plan.references.items()}


def _open_references(plan: Detector1Plan, exp: Exposure, stack: ExitStack) -> dict[str, Reference]:
    refs: dict[str, Reference] = {}
    for reftype, path in plan.references.items():
        if path == NOT_APPLICABLE:
            continue
        ref = Reference(reftype, path, exp) if reftype == "ipc" else open_reference(reftype, path, exp)
        stack.callback(ref.close)
        refs[reftype] = ref
    return refs


class _ChunkRunner:
    """Applies the planned steps to row chunks and accumulates the full-frame outputs."""

    def __init__(self, plan: Detector1Plan, refs: Mapping[str, Reference], timer: _Timer) -> None:
        self.plan, self.refs, self.timer = plan, refs, timer
        self.exp = plan.exposure
        self.refpix_plan: Any = None
        self.jump_stats: list[Any] = []
        self.frame_dnu_groups: np.ndarray | None = None
        self.ramp_result: Any = None
        self.ramp_arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        #: the ramp's average dark current (e-/s): None, a scalar or (ny, nx); see _average_dark_current
        self.average_dark: float | np.ndarray | None = None
        self.first_group_all_saturated = True
        self._kernels = _load_kernels(plan)
        ipc_rows = refs["ipc"].layout("SCI").shape[-2] if "ipc" in refs and plan.runs("ipc") else 3
        self.halo = halo_rows(plan, ipc_rows)

    # -- the chunk loop --------------------------------------------------------------------
    def stream(self, source: RampSource, chunk_rows: int) -> Any:
        nints, ngroups, ny, nx = source.shape
        fit = self.plan.runs("ramp_fit")
        keep_ramp = not fit or bool(self.plan.pipeline_params.get("save_calibrated_ramp"))
        if fit:
            # rate may alias rateints[0] (one integration) unless gain_scale rescales both afterwards
            self.ramp_result = self._kernels["ramp_fit"].RampFitResult.empty(
                nints, ny, nx, share_single_integration=not self.plan.runs("gain_scale"))
        if keep_ramp:
            self.ramp_arrays = (np.empty((nints, ngroups, ny, nx), np.float32),
                                np.empty((nints, ngroups, ny, nx), np.uint8), np.empty((ny, nx), np.uint32))
        for y0, y1, own0, own1 in chunk_bounds(ny, chunk_rows, self.halo):
            data, gdq, pdq = self.timer.run("read", source.read, y0, y1)
            chunk = _Chunk(y0, y1, own0, own1, data, gdq, pdq)
            self.calibrate(chunk, stop_before=None)
            own = chunk.owned
            if keep_ramp:
                sci, gdq_all, pdq_all = self.ramp_arrays  # type: ignore[misc]
                sci[:, :, own0:own1] = chunk.data[:, :, own]
                gdq_all[:, :, own0:own1] = chunk.gdq[:, :, own]
                pdq_all[own0:own1] = chunk.pdq[own]
            if fit:
                self._fit(chunk)
        if fit and self.first_group_all_saturated and ngroups > 0:
            raise InputError(source.path, "every pixel is saturated in the first group: no rate can be computed")
        return self.ramp_result

    def calibrate(self, chunk: _Chunk, stop_before: str | None) -> None:
        """Apply the planned steps, in jwst's order, up to (not including) ``stop_before``."""
        for name, apply in self._sequence():
            if name == stop_before:
                return
            if self.plan.runs(name):
                self.timer.run(name, apply, chunk)

    def _sequence(self) -> tuple[tuple[str, Callable[[_Chunk], None]], ...]:
        return (("group_scale", self._group_scale), ("dq_init", self._dq_init),
                ("saturation", self._saturation), ("ipc", self._ipc), ("superbias", self._superbias),
                ("refpix", self._refpix), ("linearity", self._linearity), ("dark_current", self._dark),
                ("charge_migration", self._charge_migration), ("jump", self._jump))

    # -- steps -----------------------------------------------------------------------------
    def _rows(self, reftype: str, extname: str, chunk: _Chunk, dtype: type = np.float32,
              nplanes: int | None = None) -> np.ndarray:
        """Reference values for the chunk's rows and columns, read once per chunk and step."""
        key = (reftype, extname, nplanes)
        if key not in chunk.refs:
            chunk.refs[key] = self.refs[reftype].rows(extname, chunk.y0, chunk.y1, dtype=dtype, nplanes=nplanes,
                                                      x0=chunk.x0, x1=chunk.x1)
        return chunk.refs[key]

    def _dq(self, reftype: str, chunk: _Chunk) -> np.ndarray:
        """Reference DQ in pipeline bits (3-D DQ OR-ed over planes) for the chunk's rows and columns."""
        key = (reftype, "DQ", None)
        if key not in chunk.refs:
            dq = self.refs[reftype].dq_rows(chunk.y0, chunk.y1, x0=chunk.x0, x1=chunk.x1)
            chunk.refs[key] = np.bitwise_or.reduce(dq, axis=0) if dq.ndim == 3 else dq
        return chunk.refs[key]

    def _group_scale(self, chunk: _Chunk) -> None:
        self._kernels["corrections"].group_scale(chunk.data, self.exp.frmdivsr, self.exp.nframes)

    def _dq_init(self, chunk: _Chunk) -> None:
        self._kernels["corrections"].dq_init(chunk.pdq, chunk.gdq, self._dq("mask", chunk))

    def _saturation(self, chunk: _Chunk) -> None:
        p = self.plan.params["saturation"]
        bias = self._rows("superbias", "SCI", chunk) if "superbias" in self.refs else None
        self._kernels["corrections"].saturation(
            chunk.data, chunk.gdq, chunk.pdq, self._rows("saturation", "SCI", chunk),
            self._dq("saturation", chunk), bias=bias, n_pix_grow_sat=int(p["n_pix_grow_sat"]),
            use_readpatt=bool(p["use_readpatt"]), nframes=self.exp.nframes)

    def _ipc(self, chunk: _Chunk) -> None:
        corrections = self._kernels["corrections"]
        e = self.exp
        nref = corrections.ipc_nref(e.substrt1, e.substrt2, e.subsize1, e.subsize2)
        corrections.ipc(chunk.data, self.refs["ipc"].whole("SCI"), nref, row_start=chunk.y0, frame_ny=e.subsize2)

    def _superbias(self, chunk: _Chunk) -> None:
        self._kernels["corrections"].superbias(chunk.data, chunk.pdq, self._rows("superbias", "SCI", chunk),
                                               self._dq("superbias", chunk))

    def _refpix(self, chunk: _Chunk) -> None:
        self._kernels["refpix"].apply_refpix(chunk.data, self.refpix_plan, chunk.y0)

    def _linearity(self, chunk: _Chunk) -> None:
        # jwst takes the read-level path when the reference has inverse coefficients and groups
        # average several frames (uncal files carry no READ_TIMES)
        read_level = self.refs["linearity"].has("INV_COEFFS") and self.exp.nframes > 1
        self._kernels["corrections"].linearity(
            chunk.data, chunk.gdq, chunk.pdq, self._rows("linearity", "COEFFS", chunk),
            self._dq("linearity", chunk), nframes=self.exp.nframes,
            inv_coeffs=self._rows("linearity", "INV_COEFFS", chunk) if read_level else None)

    def _dark(self, chunk: _Chunk) -> None:
        ref = self.refs["dark"]
        dark_nframes = int(ref.keyword("NFRAMES", 1))
        dark_groupgap = int(ref.keyword("GROUPGAP", 0))
        nplanes = min(ref.layout("SCI").shape[0],
                      _dark_planes_needed(self.exp, dark_nframes, dark_groupgap))
        status = self._kernels["corrections"].dark_current(
            chunk.data, chunk.pdq, self._rows("dark", "SCI", chunk, nplanes=nplanes), self._dq("dark", chunk),
            nframes=self.exp.nframes, groupgap=self.exp.groupgap, dark_nframes=dark_nframes,
            dark_groupgap=dark_groupgap)
        if status != COMPLETE:
            self.plan.status["dark_current"] = SKIPPED
            self.plan.skip_reason["dark_current"] = "dark NFRAMES/GROUPGAP exceed the science readout's"

    def _charge_migration(self, chunk: _Chunk) -> None:
        self._kernels["corrections"].charge_migration(
            chunk.data, chunk.gdq, float(self.plan.params["charge_migration"]["signal_threshold"]))

    def _jump(self, chunk: _Chunk) -> None:
        jump = self._kernels["jump"]
        own = chunk.owned
        dnu = jump.dnu_group_mask(np.ascontiguousarray(chunk.gdq[:, :, own]))
        self.frame_dnu_groups = dnu if self.frame_dnu_groups is None else self.frame_dnu_groups & dnu
        stats = jump.detect_jumps(chunk.data, chunk.gdq, chunk.pdq, self._rows("readnoise", "SCI", chunk),
                                  self._rows("gain", "SCI", chunk), self.exp.frame_time, self.exp.group_time,
                                  self.exp.nframes, self._jump_params, gain_median=self._gain_median,
                                  halo=chunk.halo)
        self.jump_stats.append(stats)

    def _fit(self, chunk: _Chunk) -> None:
        rf = self._kernels["ramp_fit"]
        own = chunk.owned
        gdq = chunk.gdq[:, :, own]
        self.first_group_all_saturated &= bool(np.all(gdq[:, 0] & np.uint8(dqflags.SATURATED)))
        readnoise = self._rows("readnoise", "SCI", chunk)[own]
        gain = self._rows("gain", "SCI", chunk)[own]
        dark = self.average_dark
        if isinstance(dark, np.ndarray):
            dark = dark[chunk.own0:chunk.own1]
        self.timer.run("ramp_fit", rf.fit_ramps, chunk.data[:, :, own], gdq, chunk.pdq[own], readnoise, gain,
                       self.exp.frame_time,
                       self.exp.group_time, self.exp.nframes, self.exp.groupgap, self.exp.drpfrms1,
                       self._ramp_params, out=self.ramp_result, row_offset=chunk.own0, dark_current=dark)

    @functools.cached_property
    def _gain_median(self) -> float:
        """Median gain over the (sub)array: jwst's substitute for unusable gain values."""
        return float(np.nanmedian(self.refs["gain"].rows("SCI", 0, self.exp.subsize2)))

    # -- parameters ------------------------------------------------------------------------
    @property
    def _jump_params(self) -> Any:
        if not hasattr(self, "_jp"):
            self._jp = self._kernels["jump"].JumpParameters.from_mapping(_step_only(self.plan.params["jump"]))
        return self._jp

    @property
    def _ramp_params(self) -> Any:
        if not hasattr(self, "_rp"):
            self._rp = self._kernels["ramp_fit"].RampFitParameters.from_mapping(
                _step_only(self.plan.params["ramp_fit"]))
        return self._rp


def _step_only(params: Mapping[str, Any]) -> dict[str, Any]:
    """A step's own parameters, without stpipe's common ones and overrides."""
    return {k: v for k, v in params.items()
            if k not in ("skip", "save_results", "suffix") and not k.startswith("override_")}


def _average_dark_current(plan: Detector1Plan, refs: Mapping[str, Reference],
                          source: RampSource) -> float | np.ndarray | None:
    """The ramp's average dark current (e-/s), added to the rate in ramp_fit's Poisson variance.

    jwst 3.0's rule, quirks included: a ramp input keeps its own AVDRKCUR image unless the dark
    step runs; then the step's ``average_dark_current`` parameter wins, else the dark reference's
    scalar AVDRKCUR keyword (default 0) when its 2-D AVDRKCUR image is absent or all zero. A
    non-zero 2-D image replaces the ramp's only if the ramp already has one of the same shape:
    jwst compares it with the ramp's current array, which an uncal input does not have, so for
    uncal inputs the image is ignored (jwst warns and fits with no dark current).
    Returns a float, a float32 (ny, nx) array, or None (no dark current, no AVDRKCUR written).
    """
    exp = plan.exposure
    existing = _read_2d(source.path, "AVDRKCUR", (exp.subsize2, exp.subsize1)) if source.kind == "ramp" else None
    if not plan.runs("dark_current"):
        return existing
    param = plan.params["dark_current"].get("average_dark_current")
    if param is not None:
        return float(param)
    ref = refs["dark"]
    avg = _read_2d(ref.path, "AVDRKCUR", None) if ref.has("AVDRKCUR") else None
    if avg is None or float(np.sum(avg)) == 0.0:
        return float(ref.keyword("AVDRKCUR", 0.0) or 0.0)
    if existing is None or avg.shape != existing.shape:
        log.warning("dark AVDRKCUR image does not match the ramp's average dark current: not applied "
                    "(as in jwst)", dark=Path(ref.path).name, shape=avg.shape)
        return existing
    return avg


def _read_2d(path: str, extname: str, shape: tuple[int, int] | None) -> np.ndarray | None:
    """A 2-D image extension as float32, or None if absent (or not of ``shape`` when given)."""
    with open_header(path) as hdul:
        if extname not in [h.name for h in hdul]:
            return None
        layout = image_layout(hdul, extname, path)
    if len(layout.shape) != 2 or (shape is not None and layout.shape != shape):
        return None
    with RowReader(layout) as reader:
        return reader.read(0, layout.shape[0], dtype=np.float32)


def _dark_planes_needed(exp: Exposure, dark_nframes: int, dark_groupgap: int) -> int:
    """Dark planes spanning the science readout's frames (a shorter dark is extrapolated)."""
    science_frames = exp.ngroups * exp.nframes + (exp.ngroups - 1) * exp.groupgap
    step = dark_nframes + dark_groupgap
    return max(2, -(-(science_frames + dark_groupgap) // step))


def _load_kernels(plan: Detector1Plan) -> dict[str, Any]:
    """Import only the kernel modules this run uses (numba compilation is per module)."""
    import importlib  # noqa: PLC0415

    kernels: dict[str, Any] = {}
    wanted = {"corrections": any(plan.runs(s) for s in ("group_scale", "dq_init", "saturation", "ipc",
                                                         "superbias", "linearity", "dark_current",
                                                         "charge_migration", "gain_scale")),
              "refpix": plan.runs("refpix"), "jump": plan.runs("jump"), "ramp_fit": plan.runs("ramp_fit")}
    for module, needed in wanted.items():
        if needed:
            kernels[module] = importlib.import_module(f"{__package__}.{module}")
    return kernels


# ---------------------------------------------------------------------------------------------
# Reference pixels: first pass
# ---------------------------------------------------------------------------------------------

def _measure_refpix(source: RampSource, runner: _ChunkRunner, chunk_rows: int) -> Any:
    """First pass: the pre-refpix steps on the border pixels only, then the corrections.

    Every reference pixel lies within 4 pixels of the (sub)array's edges, and the steps before
    refpix act pixel by pixel on what refpix reads (data and pixel DQ), so this pass touches
    only the top/bottom rows and the left/right column strips. IPC is spatial: with IPC on, the
    pass runs on full-width chunks with halo rows instead.
    """
    refpix = runner._kernels["refpix"]
    exp = runner.exp
    nints, ngroups, ny, nx = source.shape
    border = refpix.RefBorder.empty((nints, ngroups), ny, nx, np.float32)
    dq_border = refpix.RefBorder.empty((), ny, nx, np.uint32)
    for y0, y1, own0, own1, x0, x1 in _border_windows(ny, nx, chunk_rows, refpix.NREF, runner.halo,
                                                      runner.plan.runs("ipc")):
        chunk = _Chunk(y0, y1, own0, own1, *source.read(y0, y1, x0, x1), x0, x1)
        runner.calibrate(chunk, stop_before="refpix")
        own = chunk.owned
        _fill_border(border, chunk.data[:, :, own], own0, x0, nx)
        _fill_border(dq_border, chunk.pdq[own], own0, x0, nx)
    params = runner.plan.params["refpix"]
    geometry = refpix.RefpixGeometry(exp.substrt1, exp.substrt2, exp.subsize1, exp.subsize2, exp.fastaxis,
                                     exp.slowaxis, exp.noutputs, exp.subarray)
    if params["refpix_algorithm"] != "median":
        raise StepNotImplementedError(f"refpix_algorithm={params['refpix_algorithm']!r} is not implemented; "
                                      "only 'median' (jwst's default) is")
    plan = refpix.measure_refpix(border, dq_border, geometry, odd_even_columns=bool(params["odd_even_columns"]),
                                 use_side_ref_pixels=bool(params["use_side_ref_pixels"]),
                                 side_smoothing_length=int(params["side_smoothing_length"]),
                                 side_gain=float(params["side_gain"]))
    if plan.status != COMPLETE:
        runner.plan.status["refpix"] = SKIPPED
        runner.plan.skip_reason["refpix"] = "subarray outside the detector"
    return plan


def _border_windows(ny: int, nx: int, chunk_rows: int, width: int, halo: int, full_width: bool
                    ) -> Iterator[tuple[int, int, int, int, int, int]]:
    """(y0, y1, own0, own1, x0, x1) windows covering every pixel within ``width`` of an edge."""
    if full_width or nx <= 2 * width or ny <= 2 * width:
        for y0, y1, own0, own1 in chunk_bounds(ny, chunk_rows, halo):
            yield y0, y1, own0, own1, 0, nx
        return
    yield 0, width, 0, width, 0, nx
    for _, _, own0, own1 in chunk_bounds(ny - 2 * width, chunk_rows, halo=0):
        for x0, x1 in ((0, width), (nx - width, nx)):
            yield own0 + width, own1 + width, own0 + width, own1 + width, x0, x1
    yield ny - width, ny, ny - width, ny, 0, nx


def _fill_border(border: Any, block: np.ndarray, row0: int, x0: int, nx: int) -> None:
    """Copy a (possibly column-windowed) block of rows into a RefBorder."""
    if block.shape[-1] == nx:
        border.fill(block, row0)
        return
    rows = slice(row0, row0 + block.shape[-2])
    target = border.left if x0 == 0 else border.right
    target[..., rows, :] = block


# ---------------------------------------------------------------------------------------------
# Products
# ---------------------------------------------------------------------------------------------

def _write_products(source: RampSource, plan: Detector1Plan, uris: dict[str, str], runner: _ChunkRunner,
                    result: Any, output_dir: str | Path, fsync: bool, timer: _Timer) -> dict[str, Path]:
    exp = plan.exposure
    spec_keywords = {s.name: s.keyword for s in plan.steps}
    statuses = {spec_keywords[name]: status for name, status in plan.status.items()}
    extra = _jump_keywords(plan, runner)
    statuses = {spec_keywords[name]: status for name, status in plan.status.items()}
    provenance = Provenance(plan.context, crds_version(), uris, statuses, extra)
    name = Path(source.path).name
    products: dict[str, Path] = {}
    if runner.ramp_arrays is not None:
        sci, gdq, pdq = runner.ramp_arrays
        suffix = "ramp" if plan.pipeline else plan.steps[0].name
        products["ramp"] = timer.run("write", write_ramp, product_path(output_dir, name, suffix),
                                     exp.header, provenance, sci, pdq, gdq, fsync=fsync,
                                     average_dark_current=runner.average_dark)
    if result is not None:
        if plan.runs("gain_scale"):
            timer.run("gain_scale", _gain_scale, runner, result, float(exp.gainfact or 1.0))
        products["rate"] = timer.run("write", write_rate, product_path(output_dir, name, "rate"), exp.header,
                                     provenance, result.rate, result.rate_dq, result.rate_var_poisson,
                                     result.rate_var_rnoise, result.rate_err, fsync=fsync,
                                     sci_cards=source.sci_cards)
        products["rateints"] = timer.run("write", write_rate, product_path(output_dir, name, "rateints"),
                                         exp.header, provenance, result.ints_rate, result.ints_dq,
                                         result.ints_var_poisson, result.ints_var_rnoise, result.ints_err,
                                         fsync=fsync, sci_cards=source.sci_cards)
    return products


def _gain_scale(runner: _ChunkRunner, result: Any, factor: float) -> None:
    scale = runner._kernels["corrections"].gain_scale
    scale(result.rate, result.rate_err, result.rate_var_poisson, result.rate_var_rnoise, factor)
    scale(result.ints_rate, result.ints_err, result.ints_var_poisson, result.ints_var_rnoise, factor)


def _jump_keywords(plan: Detector1Plan, runner: _ChunkRunner) -> dict[str, object]:
    """PRIMECRS / EXTNCRS as jwst records them (cosmic rays per 1000 pixels per second)."""
    if not plan.runs("jump") or not runner.jump_stats:
        return {}
    jump = runner._kernels["jump"]
    stats = jump.JumpStats.combine(runner.jump_stats)
    if stats.method == "not_run":
        plan.status["jump"], plan.skip_reason["jump"] = SKIPPED, "too few groups for jump detection"
        return {}
    exp = plan.exposure
    n_dnu = int(np.count_nonzero(runner.frame_dnu_groups)) if runner.frame_dnu_groups is not None else 0
    rate = jump.primary_cosmic_ray_rate(stats.primary_crs, exp.nints, exp.ngroups, n_dnu, exp.group_time,
                                        exp.subsize2, exp.subsize1)
    if rate is None:
        return {}
    return {"PRIMECRS": (float(rate), "Primary cosmic rays per 1000 pixels per second"),
            "EXTNCRS": (0.0, "Snowballs/showers per million pixels per second")}


# ---------------------------------------------------------------------------------------------
# One call for callers (CLI, daemon workers)
# ---------------------------------------------------------------------------------------------

def calibrate_file(input_path: str | Path, output_dir: str | Path, *, only_step: str | None = None,
                   cli_steps: Mapping[str, Mapping[str, Any]] | None = None,
                   cli_pipeline: Mapping[str, Any] | None = None, parameter_file: str | Path | None = None,
                   context: str | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                   fsync: bool = True) -> Detector1Result:
    """Open, plan, run and write: detector1 (or one of its steps) on one file."""
    source = open_ramp_source(input_path)
    try:
        plan = plan_detector1(source.exposure, only_step=only_step, cli_steps=cli_steps,
                              cli_pipeline=cli_pipeline, parameter_file=parameter_file, context=context)
        for step, reason in plan.skip_reason.items():
            log.debug("step skipped", step=step, reason=reason)
        return run_detector1(source, plan, output_dir, chunk_rows=chunk_rows, fsync=fsync)
    finally:
        source.close()
