"""What every pipeline decides before touching a pixel: parameters and reference files.

Shared by calwebb_detector1 and calwebb_image2: step parameters merged from their four sources
(defaults < CRDS ``pars-*`` < parameter file < command line) and each running step's references,
overrides winning over CRDS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Collection, Mapping

from .crdsrefs import NOT_APPLICABLE, select_references
from .errors import ReferenceFileError
from .parameters import (PIPELINE_CLASS, PIPELINE_KEY, StepSpec, crds_steppars_disabled, pipeline_parameters,
                         read_parameter_file, resolve)

COMPLETE = "COMPLETE"


def select_optional_references(params: Mapping[str, Any], reftypes: list[str], context: str) -> dict[str, str]:
    """Like select_references, but a type the context does not define is simply N/A.

    A file CRDS names but the local cache lacks is still an error. Types the instrument's imap
    does not define are N/A without asking crds (which would log an ERROR line for each).
    """
    known = _defined_reftypes(params, context)
    if known is not None:
        unknown = {r: NOT_APPLICABLE for r in reftypes if r.lower() not in known}
        reftypes = [r for r in reftypes if r.lower() in known]
        if not reftypes:
            return unknown
        return {**unknown, **_select_defined_optional(params, reftypes, context)}
    return _select_defined_optional(params, reftypes, context)


def _defined_reftypes(params: Mapping[str, Any], context: str) -> set[str] | None:
    """Reference types ``context`` defines for the exposure's instrument (None: cannot tell)."""
    instrument = params.get("META.INSTRUMENT.NAME", params.get("INSTRUME"))
    if not instrument:
        return None
    try:
        import crds  # noqa: PLC0415 - the environment is set by crdsrefs before any selection

        imap = crds.get_cached_mapping(context).get_imap(str(instrument).lower())
        return {str(k).lower() for k in imap.selections}
    except Exception:  # noqa: BLE001 - any crds failure: let the selection itself report it
        return None


def _select_defined_optional(params: Mapping[str, Any], reftypes: list[str], context: str) -> dict[str, str]:
    """Select types the context defines; those without a match are N/A."""
    try:
        return select_references(params, reftypes, context)
    except ReferenceFileError:
        out: dict[str, str] = {}
        for reftype in reftypes:
            try:
                out.update(select_references(params, [reftype], context))
            except ReferenceFileError as exc:
                if "not available in the local" in exc.problem:
                    raise
                out[reftype] = NOT_APPLICABLE
        return out


def resolve_parameters(steps: tuple[StepSpec, ...], pipeline: str | None, params_crds: Mapping[str, Any],
                       context: str, parameter_file: str | Path | None = None,
                       cli_steps: Mapping[str, Mapping[str, Any]] | None = None,
                       cli_pipeline: Mapping[str, Any] | None = None
                       ) -> tuple[dict[str, dict[str, Any]], dict[str, Any], list[str]]:
    """(step parameters, pipeline parameters, the sources used, lowest first).

    ``pipeline`` is None for a single-step run: only the steps' own ``pars-*`` apply then.
    """
    names = [s.name for s in steps]
    layers: list[tuple[str, Mapping[str, Mapping[str, Any]]]] = []
    if not crds_steppars_disabled():
        reftypes = [s.pars_reftype for s in steps]
        if pipeline is not None:
            reftypes.append("pars-" + PIPELINE_CLASS[pipeline].lower())
        found = select_optional_references(params_crds, reftypes, context)
        for reftype in reftypes:
            path = found.get(reftype, NOT_APPLICABLE)
            if path != NOT_APPLICABLE:
                layers.append((f"CRDS {reftype} {Path(path).name}", read_parameter_file(path, names)))
    if parameter_file:
        layers.append((str(parameter_file), read_parameter_file(parameter_file, names)))
    if cli_steps:
        layers.append(("command line", cli_steps))
    params = resolve(steps, layers)
    pipeline_params: dict[str, Any] = {}
    if pipeline is not None:
        pipeline_layers = [(src, layer.get(PIPELINE_KEY, {})) for src, layer in layers]
        pipeline_layers.append(("command line", dict(cli_pipeline or {})))
        pipeline_params = pipeline_parameters(pipeline, pipeline_layers)
    return params, pipeline_params, ["defaults"] + [src for src, _ in layers]


def select_step_references(steps: tuple[StepSpec, ...], params: Mapping[str, Mapping[str, Any]],
                           status: Mapping[str, str], params_crds: Mapping[str, Any], context: str,
                           optional: Collection[str] = ()) -> dict[str, str]:
    """``{reftype: path | N/A}`` for the running steps; ``override_<reftype>`` wins over CRDS.

    Types in ``optional`` are N/A when the context does not define them.
    """
    wanted: dict[str, str | None] = {}
    for spec in steps:
        if status.get(spec.name) != COMPLETE:
            continue
        for reftype in spec.reftypes:
            override = params[spec.name].get(f"override_{reftype}")
            if override is not None:
                _check_override(reftype, str(override))
                wanted[reftype] = str(override)
            else:
                wanted.setdefault(reftype, None)
    required = [r for r, v in wanted.items() if v is None and r not in optional]
    selected = select_references(params_crds, required, context) if required else {}
    rest = [r for r, v in wanted.items() if v is None and r in optional]
    if rest:
        selected.update(select_optional_references(params_crds, rest, context))
    return {r: (v if v is not None else selected[r]) for r, v in wanted.items()}


def _check_override(reftype: str, value: str) -> None:
    if value.upper() != NOT_APPLICABLE and not Path(value).is_file():
        raise ReferenceFileError(reftype, "override file does not exist", value)
