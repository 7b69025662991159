"""Step parameters: jwst's names and defaults, merged from four sources.

Lowest to highest precedence: the coded defaults, CRDS parameter references (``pars-<stepclass>``,
then the pipeline's ``pars-detector1pipeline``), a user parameter file, the command line.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import ParameterError

#: parameters every step accepts (stpipe's common spec, the parts that mean something here)
COMMON_DEFAULTS: dict[str, Any] = {"skip": False, "save_results": False, "suffix": None}


@dataclass(frozen=True)
class StepSpec:
    """A calwebb step: its jwst class, reference types, defaults and S_<STEP> keyword."""

    name: str
    class_name: str
    keyword: str                     # the S_<STEP> primary-header keyword
    reftypes: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    skip_by_default: bool = False

    @property
    def pars_reftype(self) -> str:
        return "pars-" + self.class_name.lower()

    def all_defaults(self) -> dict[str, Any]:
        out = dict(COMMON_DEFAULTS)
        out["skip"] = self.skip_by_default
        out.update(self.defaults)
        out.update({f"override_{r}": None for r in self.reftypes})
        return out


def _jump_defaults() -> dict[str, Any]:
    from .jump import JumpParameters  # noqa: PLC0415 - keeps this module import-light

    return _dataclass_defaults(JumpParameters)


def _ramp_defaults() -> dict[str, Any]:
    from .ramp_fit import RampFitParameters  # noqa: PLC0415

    return _dataclass_defaults(RampFitParameters)


def _dataclass_defaults(cls: type) -> dict[str, Any]:
    import dataclasses  # noqa: PLC0415

    return {f.name: f.default for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING}


class _LazyDefaults(Mapping[str, Any]):
    """Defaults owned by a kernel module, loaded the first time they are needed."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader
        self._value: dict[str, Any] | None = None

    def _get(self) -> dict[str, Any]:
        if self._value is None:
            self._value = self._loader()
        return self._value

    def __getitem__(self, key: str) -> Any:
        return self._get()[key]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


DETECTOR1_NIR: tuple[StepSpec, ...] = (
    StepSpec("group_scale", "GroupScaleStep", "S_GRPSCL"),
    StepSpec("dq_init", "DQInitStep", "S_DQINIT", ("mask",)),
    StepSpec("saturation", "SaturationStep", "S_SATURA", ("saturation", "superbias"),
             {"n_pix_grow_sat": 1, "use_readpatt": True}),
    StepSpec("ipc", "IPCStep", "S_IPC", ("ipc",)),
    StepSpec("superbias", "SuperBiasStep", "S_SUPERB", ("superbias",)),
    StepSpec("refpix", "RefPixStep", "S_REFPIX", (),
             {"odd_even_columns": True, "use_side_ref_pixels": True, "side_smoothing_length": 11,
              "side_gain": 1.0, "odd_even_rows": True, "refpix_algorithm": "median"}),
    StepSpec("linearity", "LinearityStep", "S_LINEAR", ("linearity",)),
    StepSpec("dark_current", "DarkCurrentStep", "S_DARK", ("dark",),
             {"dark_output": None, "average_dark_current": None}),
    StepSpec("charge_migration", "ChargeMigrationStep", "S_CHGMIG", (),
             {"signal_threshold": 25000.0}, skip_by_default=True),
    StepSpec("jump", "JumpStep", "S_JUMP", ("gain", "readnoise"), _LazyDefaults(_jump_defaults)),
    StepSpec("picture_frame", "PictureFrameStep", "S_PCTFRM", ("pictureframe",), skip_by_default=True),
    StepSpec("clean_flicker_noise", "CleanFlickerNoiseStep", "S_CLNFNS", ("flat",), skip_by_default=True),
    StepSpec("persistence", "PersistenceStep", "S_PERSIS", (), skip_by_default=True),
    StepSpec("ramp_fit", "RampFitStep", "S_RAMP", ("readnoise", "gain"), _LazyDefaults(_ramp_defaults)),
    StepSpec("gain_scale", "GainScaleStep", "S_GANSCL", ("gain",)),
)

#: calstream's weighting default for resample and outlier_detection (jwst's is "ivm"): inverse
#: VAR_RNOISE smoothed by a running median (:func:`calstream.steps.resample.drizzle_weight`)
DEFAULT_WEIGHT_TYPE = "ivm-smed"
#: jwst 3.0 ResampleStep spec (calwebb_image2 and calwebb_image3), weight_type aside
RESAMPLE_DEFAULTS: dict[str, Any] = {
    "pixfrac": 1.0, "kernel": "square", "fillval": "NAN", "weight_type": DEFAULT_WEIGHT_TYPE, "output_shape": None, "crpix": None,
    "crval": None, "rotation": None, "pixel_scale_ratio": 1.0, "pixel_scale": None, "output_wcs": "", "single": False,
    "blendheaders": True, "in_memory": True, "enable_ctx": True, "enable_err": True, "report_var": True,
    "propagate_dq": False, "pixmap_stepsize": 1.0, "pixmap_order": 1}

#: calwebb_image2 (Image2Pipeline) for imaging; resample is off by default here (jwst runs it)
IMAGE2: tuple[StepSpec, ...] = (
    StepSpec("bkg_subtract", "BackgroundStep", "S_BKDSUB", ("bkg", "wavelengthrange"),
             {"save_combined_background": False, "sigma": 3.0, "maxiters": None, "soss_source_percentile": 35.0,
              "soss_bkg_percentile": None, "wfss_mmag_extract": None, "wfss_maxiter": 5,
              "wfss_rms_stop": 0.0, "wfss_outlier_percent": 1.0}),
    StepSpec("assign_wcs", "AssignWcsStep", "S_WCS", ("distortion", "filteroffset"),
             {"sip_approx": True, "sip_max_pix_error": 0.01, "sip_degree": None, "sip_max_inv_pix_error": 0.01,
              "sip_inv_degree": None, "sip_npoints": 12, "slit_y_low": -0.55, "slit_y_high": 0.55,
              "nrs_ifu_slice_wcs": False}),
    StepSpec("flat_field", "FlatFieldStep", "S_FLAT", ("flat",),
             {"save_interpolated_flat": False, "user_supplied_flat": None, "inverse": False}),
    StepSpec("photom", "PhotomStep", "S_PHOTOM", ("photom", "area"),
             {"inverse": False, "source_type": None, "mrs_time_correction": True, "apply_time_correction": True}),
    StepSpec("resample", "ResampleStep", "S_RESAMP", (), RESAMPLE_DEFAULTS, skip_by_default=True),
)

#: calwebb_image3 (Image3Pipeline) for imaging, jwst 3.0 step specs (weight_type aside)
IMAGE3: tuple[StepSpec, ...] = (
    StepSpec("assign_mtwcs", "AssignMTWcsStep", "S_MTWCS"),
    StepSpec("tweakreg", "TweakRegStep", "S_TWKREG", (), {
        "use_custom_catalogs": False, "catalog_format": "ecsv", "catfile": "", "starfinder": "iraf",
        "snr_threshold": 10.0, "kernel_fwhm": 2.5, "bkg_boxsize": 400, "minsep_fwhm": 0.0, "sigma_radius": 1.5,
        "sharplo": 0.5, "sharphi": 2.0, "roundlo": 0.0, "roundhi": 0.2, "brightest": 200, "peakmax": None,
        "npixels": 10, "connectivity": 8, "nlevels": 32, "contrast": 0.001, "multithresh_mode": "exponential",
        "localbkg_width": 0, "apermask_method": "correct", "kron_params": None, "deblend": True,
        "enforce_user_order": False, "expand_refcat": False, "minobj": 15, "fitgeometry": "rshift", "nclip": 3,
        "sigma": 3.0, "searchrad": 2.0, "use2dhist": True, "separation": 1.0, "tolerance": 0.7, "xoffset": 0.0,
        "yoffset": 0.0, "abs_refcat": "", "save_abs_catalog": False, "abs_minobj": 15, "abs_fitgeometry": "rshift",
        "abs_nclip": 3, "abs_sigma": 3.0, "abs_searchrad": 6.0, "abs_use2dhist": True, "abs_separation": 1.0,
        "abs_tolerance": 0.7, "sip_approx": True, "sip_max_pix_error": 0.01, "sip_degree": None,
        "sip_max_inv_pix_error": 0.01, "sip_inv_degree": None, "sip_npoints": 12, "in_memory": True,
        "save_catalogs": False}),
    StepSpec("skymatch", "SkyMatchStep", "S_SKYMAT", (), {
        "skymethod": "match", "match_down": True, "subtract": False, "skylist": None, "stepsize": None,
        "skystat": "mode", "dqbits": "~DO_NOT_USE+NON_SCIENCE", "lower": None, "upper": None, "nclip": 5,
        "lsigma": 4.0, "usigma": 4.0, "binwidth": 0.1, "in_memory": True}),
    StepSpec("outlier_detection", "OutlierDetectionStep", "S_OUTLIR", (), {
        "weight_type": DEFAULT_WEIGHT_TYPE, "pixfrac": 1.0, "kernel": "square", "fillval": "NAN", "maskpt": 0.7, "snr": "5.0 4.0",
        "scale": "1.2 0.7", "backg": 0.0, "kernel_size": "7 7", "threshold_percent": 99.8,
        "rolling_window_width": 25, "ifu_second_check": False, "save_intermediate_results": False,
        "resample_data": True, "good_bits": "~DO_NOT_USE", "in_memory": True, "pixmap_stepsize": 1.0,
        "pixmap_order": 1}),
    StepSpec("resample", "ResampleStep", "S_RESAMP", (), RESAMPLE_DEFAULTS),
    StepSpec("source_catalog", "SourceCatalogStep", "S_SRCCAT", (), {
        "aperture_ee1": 30, "aperture_ee2": 50, "aperture_ee3": 70, "ci1_star_threshold": 2.0,
        "ci2_star_threshold": 1.8, "starfinder": "segmentation", "snr_threshold": 3.0, "bkg_boxsize": 1000,
        "kernel_fwhm": 2.0, "minsep_fwhm": 0.0, "sigma_radius": 1.5, "sharplo": 0.5, "sharphi": 2.0, "roundlo": 0.0,
        "roundhi": 0.2, "brightest": 200, "peakmax": None, "npixels": 25, "connectivity": 8, "nlevels": 32,
        "contrast": 0.001, "multithresh_mode": "exponential", "localbkg_width": 0, "apermask_method": "correct",
        "kron_params": None, "deblend": True}),
)

#: steps calstream does not implement: running them (skip=False) is an error, never a silent no-op
NOT_IMPLEMENTED: dict[str, str] = {
    "picture_frame": "NIRSpec thermal picture-frame correction is not implemented in calstream",
    "clean_flicker_noise": "1/f flicker-noise cleaning is not implemented in calstream",
    "persistence": "persistence flagging is not implemented in calstream",
}

PIPELINE_CLASS = {"calwebb_detector1": "Detector1Pipeline", "calwebb_image2": "Image2Pipeline",
                  "calwebb_image3": "Image3Pipeline"}
#: key of a parameter layer that holds pipeline-level (not step) parameters
PIPELINE_KEY = "_pipeline"
PIPELINE_PARAMETERS = {"calwebb_detector1": {"save_calibrated_ramp": False},
                       "calwebb_image2": {"save_bsub": False},
                       "calwebb_image3": {"in_memory": True}}


def step_spec(name: str, pipeline: Iterable[StepSpec] = DETECTOR1_NIR) -> StepSpec:
    for spec in pipeline:
        if spec.name == name:
            return spec
    raise ParameterError(f"unknown step {name!r}; known: " + ", ".join(s.name for s in pipeline))


def parse_value(text: str) -> Any:
    """A command-line string as the value it spells: None, bool, int, float or str."""
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def coerce(step: str, key: str, value: Any, default: Any) -> Any:
    """``value`` converted to the type of ``default`` (strings from the CLI or files)."""
    if isinstance(value, str) and not isinstance(default, str):
        value = parse_value(value)
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ParameterError(f"steps.{step}.{key} must be true/false, got {value!r}")
    if isinstance(default, (int, float)) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return type(default)(value) if isinstance(default, float) or float(value).is_integer() else value
    if isinstance(default, str):
        return str(value)
    return value


def merge_layer(resolved: dict[str, dict[str, Any]], layer: Mapping[str, Mapping[str, Any]],
                specs: Iterable[StepSpec], source: str) -> None:
    """Overlay ``{step: {param: value}}`` onto ``resolved``, validating names and types."""
    by_name = {s.name: s for s in specs}
    for step, params in layer.items():
        if step == PIPELINE_KEY:
            continue
        if step not in by_name:
            raise ParameterError(f"{source}: unknown step {step!r}")
        defaults = by_name[step].all_defaults()
        for key, value in params.items():
            if key not in defaults:
                if key in _IGNORED_STPIPE_KEYS:
                    continue
                raise ParameterError(f"{source}: step {step!r} has no parameter {key!r}")
            resolved[step][key] = coerce(step, key, value, defaults[key])


#: stpipe bookkeeping keys that appear in parameter files and mean nothing to calstream
_IGNORED_STPIPE_KEYS = frozenset({
    "input_dir", "output_dir", "output_ext", "output_use_model", "output_use_index", "search_output_file",
    "pre_hooks", "post_hooks", "save_results", "output_file", "class", "name", "maximum_cores",
})


def read_parameter_file(path: str | Path, pipeline_step_names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """A user or CRDS parameter file as ``{step: {param: value}}``.

    ASDF files use jwst's layout (``parameters`` plus ``steps: [{name, parameters}]``; a single-step
    file names its step class). TOML files use ``[steps.<name>]`` tables.
    """
    path = Path(path)
    if not path.exists():
        raise ParameterError(f"parameter file {path} does not exist")
    names = set(pipeline_step_names)
    if path.suffix.lower() == ".toml":
        with open(path, "rb") as fh:
            tree = tomllib.load(fh)
        return {k: dict(v) for k, v in tree.get("steps", {}).items()}
    tree = read_asdf_tree(path)
    return _pars_tree_layer(tree, names, str(path))


def read_asdf_tree(path: str | Path) -> dict[str, Any]:
    """The YAML tree of a parameter ASDF file, tags dropped.

    Parameter files are pure YAML (no binary blocks), so they are parsed directly: opening them
    with ``asdf`` would first load every installed ASDF extension, seconds of start-up for a
    handful of numbers. Files with binary blocks fall back to ``asdf.open``.
    """
    import yaml  # noqa: PLC0415

    raw = Path(path).read_bytes()
    head, sep, tail = raw.partition(b"\n...\n")
    if sep and tail.strip():
        return _asdf_tree(path)
    try:
        tree = yaml.load(head.decode("utf-8"), Loader=_TaglessLoader)  # noqa: S506 - safe loader subclass
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ParameterError(f"parameter file {path} is not readable ASDF/YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ParameterError(f"parameter file {path} does not hold a mapping")
    return tree


def _asdf_tree(path: str | Path) -> dict[str, Any]:
    import asdf  # noqa: PLC0415

    try:
        with asdf.open(path, lazy_load=False, memmap=False) as af:
            return dict(af.tree)
    except Exception as exc:  # asdf raises many types for a damaged file
        raise ParameterError(f"parameter file {path} is not readable ASDF: {exc}") from exc


def _tagless_loader() -> type:
    import yaml  # noqa: PLC0415

    class Loader(yaml.SafeLoader):
        """SafeLoader that reads any tagged node as the plain mapping/sequence/scalar it is."""

    def untagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
        if isinstance(node, yaml.MappingNode):
            return loader.construct_mapping(node, deep=True)
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node, deep=True)
        return loader.construct_scalar(node)

    for prefix in ("!", "tag:"):
        Loader.add_multi_constructor(prefix, untagged)
    return Loader


class _LoaderProxy:
    _cls: type | None = None

    def __call__(self, stream: Any) -> Any:
        if _LoaderProxy._cls is None:
            _LoaderProxy._cls = _tagless_loader()
        return _LoaderProxy._cls(stream)


_TaglessLoader = _LoaderProxy()


def _pars_tree_layer(tree: Mapping[str, Any], names: set[str], source: str) -> dict[str, dict[str, Any]]:
    layer: dict[str, dict[str, Any]] = {}
    for entry in tree.get("steps", []) or []:
        name = str(entry.get("name", ""))
        step = _step_name_for(name, names)
        if step is None:
            raise ParameterError(f"{source}: unknown step {name!r}")
        layer[step] = dict(entry.get("parameters", {}) or {})
    cls = str(tree.get("class", "")).rsplit(".", 1)[-1]
    own = _step_name_for(cls, names)
    if own is not None and tree.get("parameters"):
        layer.setdefault(own, {}).update(tree["parameters"])
    elif cls in PIPELINE_CLASS.values() and tree.get("parameters"):
        layer[PIPELINE_KEY] = dict(tree["parameters"])
    return layer


def _step_name_for(name: str, names: set[str]) -> str | None:
    if name in names:
        return name
    for spec in DETECTOR1_NIR + IMAGE2 + IMAGE3:
        if spec.class_name == name and spec.name in names:
            return spec.name
    return None


def pipeline_parameters(pipeline: str, layers: Iterable[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Pipeline-level parameters (``save_calibrated_ramp``, ...) from defaults and layers."""
    resolved = dict(PIPELINE_PARAMETERS[pipeline])
    for source, layer in layers:
        for key, value in layer.items():
            if key in _IGNORED_STPIPE_KEYS:
                continue
            if key not in resolved:
                raise ParameterError(f"{source}: {pipeline} has no parameter {key!r}")
            resolved[key] = coerce(pipeline, key, value, PIPELINE_PARAMETERS[pipeline][key])
    return resolved


def parse_cli_overrides(args: Iterable[str]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``--steps.jump.rejection_threshold=5`` style arguments -> (step layer, pipeline-level params)."""
    steps: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ParameterError(f"cannot parse argument {arg!r}: expected --steps.<step>.<param>=<value>")
        key, value = arg[2:].split("=", 1)
        parts = key.split(".")
        if parts[0] == "steps" and len(parts) == 3:
            steps.setdefault(parts[1], {})[parts[2]] = value
        elif len(parts) == 1:
            top[parts[0]] = value
        else:
            raise ParameterError(f"cannot parse argument {arg!r}")
    return steps, top


def crds_steppars_disabled() -> bool:
    """stpipe's switch to ignore CRDS parameter references."""
    return os.environ.get("STPIPE_DISABLE_CRDS_STEPPARS", "").strip().lower() in ("1", "true", "yes")


def resolve(specs: Iterable[StepSpec], layers: Iterable[tuple[str, Mapping[str, Mapping[str, Any]]]]
            ) -> dict[str, dict[str, Any]]:
    """Defaults overlaid by each ``(source, layer)`` in order of increasing precedence."""
    specs = tuple(specs)
    resolved = {s.name: s.all_defaults() for s in specs}
    for source, layer in layers:
        merge_layer(resolved, layer, specs, source)
    return resolved
