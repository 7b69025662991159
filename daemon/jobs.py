"""Stage functions that run INSIDE worker processes, and the classification of their errors.

A task is a small dict (see :func:`run_task`); the result is a small dict: products written (already
renamed into place by the steps), references and CRDS context used, CAL_VER, seconds per step —
or the error with its category:

* ``"input"`` — the input is bad (InputError, unreadable FITS): never retried, quarantined;
* ``"not_implemented"`` — StepNotImplementedError: never retried, recorded as failed;
* ``"parameter"`` — ParameterError (a configuration problem): never retried, failed;
* ``"reference"`` — ReferenceFileError: retried a few times (a cache being synced), then failed;
* ``"transient"`` — anything else: retried with back-off up to the try limit.

This module imports the science code only when a task runs (the daemon's main process imports
it for :func:`classify` only).
"""

from __future__ import annotations

import importlib
import os
import time
import traceback
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping

import structlog

from .intake import file_checksum

log = structlog.get_logger("calstream.daemon.jobs")

CATEGORIES = ("input", "not_implemented", "parameter", "reference", "transient")


def classify(exc: BaseException) -> str:
    """The retry category of an exception raised by a stage."""
    from calstream.steps.errors import (InputError, ParameterError,  # noqa: PLC0415
                                        ReferenceFileError, StepNotImplementedError)

    if isinstance(exc, InputError):
        return "input"
    if isinstance(exc, StepNotImplementedError):
        return "not_implemented"
    if isinstance(exc, ParameterError):
        return "parameter"
    if isinstance(exc, ReferenceFileError):
        return "reference"
    return "transient"


def warm_up() -> None:
    """Pay the one-time costs of a worker before its first job (~5 s, instead of ~4 s more on the
    first exposure): stage modules and what they import lazily (crds, stdatamodels schemas, gwcs),
    numba's compiler/target initialisation (loading the cached kernels is then quick)."""
    for module in ("calstream.steps.detector1", "calstream.steps.image2", "crds", "gwcs", "asdf"):
        importlib.import_module(module)
    _route_crds_logging()
    import numba  # noqa: PLC0415
    from stdatamodels.jwst.datamodels import ImageModel  # noqa: PLC0415

    numba.njit(lambda x: x + 1)(1)
    ImageModel((2, 2)).close()


def _route_crds_logging() -> None:
    """crds logs through its own stderr handler: send its records through structlog instead."""
    import logging  # noqa: PLC0415

    crds_logger = logging.getLogger("CRDS")
    for handler in list(crds_logger.handlers):
        crds_logger.removeHandler(handler)
    crds_logger.propagate = True
    crds_logger.setLevel(max(logging.WARNING, logging.getLogger().level))   # as logs.configure wants


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------

def run_detector1(task: Mapping[str, Any]) -> Any:
    from calstream.steps.detector1 import calibrate_file  # noqa: PLC0415

    return calibrate_file(task["input"], task["output_dir"], context=task.get("context"),
                          fsync=task.get("fsync", True))


def run_image2(task: Mapping[str, Any]) -> Any:
    from calstream.steps.image2 import calibrate_rate_file  # noqa: PLC0415

    return calibrate_rate_file(task["input"], task["output_dir"], context=task.get("context"))


def run_image3(task: Mapping[str, Any]) -> Any:
    """Write the association with its members resolved to their cal products, then run
    calwebb_image3 on it. The resolved asn is a product of the job."""
    from calstream.steps.asn import asn_from_list, write_association  # noqa: PLC0415
    from calstream.steps.errors import StepNotImplementedError  # noqa: PLC0415

    try:
        from calstream.steps.image3 import calibrate_association  # noqa: PLC0415
    except ImportError as exc:
        raise StepNotImplementedError(f"calwebb_image3 is not available in this calstream ({exc})") from exc
    asn = task["association"]
    out = Path(task["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    members = [os.path.relpath(p, out) for p in task["members"]]
    resolved = asn_from_list(members, asn["product_name"], asn_type=asn["asn_type"] or "image3",
                             asn_rule=asn["asn_rule"] or "DMS_Level3_Base", asn_id=asn["asn_id"])
    asn_path = write_association(resolved, out / f"{asn['product_name']}_{asn['asn_id']}_asn.json")
    result = calibrate_association(asn_path, out, context=task.get("context"))
    return SimpleNamespace(products={**dict(result.products), "asn": asn_path},
                           **{k: getattr(result, k, None) for k in ("references", "context", "status",
                                                                    "step_seconds")})


STAGES: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "detector1": run_detector1, "image2": run_image2, "image3": run_image3,
}


# ---------------------------------------------------------------------------------------------
# One task
# ---------------------------------------------------------------------------------------------

def run_task(task: Mapping[str, Any]) -> dict[str, Any]:
    """Run one job; never raises (errors come back classified in the result)."""
    started = time.perf_counter()
    out: dict[str, Any] = {"type": "result", "job_id": task["job_id"], "stage": task["stage"], "pid": os.getpid()}
    with ExitStack() as stack:
        stack.enter_context(structlog.contextvars.bound_contextvars(
            job=task["job_id"], step=task["stage"], exposure=task.get("exposure"),
            association=(task.get("association") or {}).get("asn_id"), context=task.get("context")))
        try:
            result = STAGES[task["stage"]](task)
            out.update(_success(result))
            log.info("job done", seconds=round(time.perf_counter() - started, 3),
                     products=sorted(out["products"]))
        except Exception as exc:  # classified and returned: the daemon decides what happens next
            out.update(ok=False, error=_error(exc))
            log.warning("job failed", error_class=type(exc).__name__, error=str(exc),
                        category=out["error"]["category"])
    out["seconds"] = time.perf_counter() - started
    return out


def _success(result: Any) -> dict[str, Any]:
    from calstream.steps.products import software_version  # noqa: PLC0415

    products = {}
    for kind, path in dict(result.products).items():
        path = Path(path)
        products[kind] = {"path": str(path.resolve()), "size": path.stat().st_size,
                          "checksum": file_checksum(path)}
    return {"ok": True, "products": products,
            "references": {k: str(v) for k, v in dict(getattr(result, "references", {}) or {}).items()},
            "context": getattr(result, "context", None), "cal_ver": software_version(),
            "status": dict(getattr(result, "status", {}) or {}),
            "step_seconds": {k: float(v) for k, v in dict(getattr(result, "step_seconds", {}) or {}).items()}}


def _error(exc: BaseException) -> dict[str, Any]:
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    return {"class": type(exc).__name__, "message": str(exc), "category": classify(exc),
            "traceback": "".join(traceback.format_list(frames)).strip()}


__all__ = ["CATEGORIES", "STAGES", "classify", "file_checksum", "run_task", "warm_up"]
