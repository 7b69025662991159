"""The resample step at file level: jwst ResampleStep parameters -> grid, co-addition, i2d product.

Shared by calwebb_image3 (many exposures -> one mosaic) and calwebb_image2 (one exposure -> its
own i2d). The kernels are :mod:`calstream.steps.resample`; this module turns the step's
parameters (jwst names: ``pixfrac``, ``kernel``, ``fillval``, ``weight_type``, ``output_shape``
[nx, ny], ``crpix``, ``crval``, ``rotation``, ``pixel_scale_ratio``, ``pixel_scale`` [arcsec],
``enable_ctx``, ``enable_err``, ``report_var``) into a grid and an accumulator, and writes the
result as an ``ImageModel`` with the grid's gwcs and exact FITS WCS.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .calimage import read_cal_arrays, read_cal_info, resample_input, save_model
from .errors import ParameterError, StepNotImplementedError
from .image2 import flag_invalid, s_region
from .resample import (GOOD_BITS, KERNELS, WEIGHT_TYPES, Mosaic, MosaicAccumulator, OutputGrid, ResampleInput,
                       WcsReference, footprint, output_grid)


#: ResampleStep parameters calstream accepts only at jwst's default value
UNSUPPORTED: dict[str, Any] = {"output_wcs": "", "single": False, "propagate_dq": False, "pixmap_stepsize": 1.0}


def check_parameters(p: Mapping[str, Any], step: str = "resample") -> None:
    """When planning, before anything is written: ParameterError for a value of the resample (or
    outlier_detection) step calstream cannot use, StepNotImplementedError for an option it does
    not implement."""
    if step == "resample":
        for key, default in UNSUPPORTED.items():
            if p.get(key, default) != default:
                raise StepNotImplementedError(f"steps.resample.{key}={p[key]!r} is not implemented in calstream "
                                              f"(only jwst's default {default!r})")
        for name, kind in (("output_shape", int), ("crpix", float), ("crval", float)):
            parameter_pair(p.get(name), name, kind)
    else:
        for name in ("snr", "scale"):
            if parameter_pair(p.get(name), name, float, step) is None:
                raise ParameterError(f"steps.{step}.{name} needs two numbers, got {p.get(name)!r}")
    if p.get("weight_type") not in WEIGHT_TYPES:
        raise ParameterError(f"steps.{step}.weight_type={p.get('weight_type')!r}: expected one of {WEIGHT_TYPES}")
    if p.get("kernel") not in KERNELS:
        raise ParameterError(f"steps.{step}.kernel={p.get('kernel')!r}: expected one of {KERNELS}")
    pixfrac = p.get("pixfrac")
    if isinstance(pixfrac, bool) or not isinstance(pixfrac, (int, float)) or not 0 < pixfrac <= 1:
        raise ParameterError(f"steps.{step}.pixfrac={pixfrac!r}: expected a number in (0, 1]")


def parameter_pair(value: Any, name: str, kind: Callable[[Any], Any], step: str = "resample") -> tuple | None:
    """A two-element list parameter ([x, y], "x,y" or "x y") as a tuple, or None."""
    if value is None or value == "":
        return None
    parts = re.split(r"[\s,]+", value.strip(" []()")) if isinstance(value, str) else list(value)
    if len(parts) != 2:
        raise ParameterError(f"steps.{step}.{name} must have two values, got {value!r}")
    if all(v is None for v in parts):
        return None
    try:
        return kind(parts[0]), kind(parts[1])
    except (TypeError, ValueError) as exc:
        raise ParameterError(f"steps.{step}.{name}: {value!r} is not two numbers") from exc


def grid_from_parameters(wcss: Sequence[Any], reference: WcsReference, ref_shape: tuple[int, int],
                         p: Mapping[str, Any] | None = None) -> OutputGrid:
    """The output grid over the footprints of ``wcss`` (the first is the reference image) with
    ResampleStep's WCS parameters ``p`` (defaults when None: outlier detection's grid)."""
    p = p or {}
    shape = parameter_pair(p.get("output_shape"), "output_shape", int)
    return output_grid([footprint(w) for w in wcss], wcss[0], reference, ref_shape,
                       pixel_scale_ratio=p.get("pixel_scale_ratio", 1.0), pixel_scale=p.get("pixel_scale"),
                       rotation=p.get("rotation"), output_shape=None if shape is None else (shape[1], shape[0]),
                       crpix=parameter_pair(p.get("crpix"), "crpix", float),
                       crval=parameter_pair(p.get("crval"), "crval", float))


def accumulator(grid: OutputGrid, n_inputs: int, p: Mapping[str, Any]) -> MosaicAccumulator:
    """A :class:`MosaicAccumulator` for ResampleStep parameters (jwst's good_bits)."""
    return MosaicAccumulator(grid, n_inputs=n_inputs, pixfrac=p["pixfrac"], kernel=p["kernel"], fillval=p["fillval"],
                             weight_type=p["weight_type"], good_bits=GOOD_BITS, enable_ctx=p["enable_ctx"],
                             enable_var=p["enable_err"], compute_err="from_var" if p["enable_err"] else None)


def resample_all(images: Iterable[tuple[ResampleInput, Any]], grid: OutputGrid, n_inputs: int,
                 p: Mapping[str, Any]) -> Mosaic:
    """Drizzle (input, pixel map or None) pairs onto ``grid``, one exposure in memory at a time."""
    acc = accumulator(grid, n_inputs, p)
    for image, pixmap in images:
        acc.add(image, pixmap)
    return acc.finalize()


def write_i2d(mosaic: Mosaic, template: str | Path, out: str | Path, p: Mapping[str, Any],
              update: Callable[[Any], None] | None = None) -> Any:
    """Save ``mosaic`` as an i2d ImageModel: metadata from the ``template`` image (jwst's
    ``update``), the grid's gwcs and FITS WCS, SCI/ERR/WHT/CON/VAR_*, resample and exposure
    totals; ``update(model)`` adds the caller's provenance. Returns the model (open: close it)."""
    from stdatamodels.jwst.datamodels import ImageModel  # noqa: PLC0415

    out = Path(out)
    model = ImageModel(None, validate_on_assignment=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ImageModel(str(template)) as first:
            model.update(first)
    grid = mosaic.grid
    model.data, model.wht = mosaic.sci, mosaic.wht
    if mosaic.con is not None:
        model.con = mosaic.con
    if mosaic.err is not None:
        model.err = mosaic.err
    elif model.meta.hasattr("bunit_err"):
        del model.meta.bunit_err
    if p["enable_err"] and p["report_var"]:
        for name, var in mosaic.variances.items():
            setattr(model, name, var)
    meta = model.meta
    meta.wcs = grid.wcs
    set_grid_wcsinfo(model, grid)
    meta.wcsinfo.s_region = s_region(grid.wcs)
    meta.photometry.pixelarea_steradians = grid.pixelarea_steradians
    meta.photometry.pixelarea_arcsecsq = grid.pixelarea_arcsecsq
    meta.resample.pointings = mosaic.pointings
    meta.resample.pixel_scale_ratio = grid.pixel_scale_ratio
    meta.resample.pixfrac = p["pixfrac"]
    record_weight_type(model, p["weight_type"])
    meta.exposure.exposure_time = meta.exposure.effective_exposure_time = mosaic.exposure_time
    meta.exposure.start_time, meta.exposure.end_time = mosaic.start_time, mosaic.end_time
    meta.exposure.duration = meta.exposure.elapsed_exposure_time = mosaic.duration
    meta.exposure.measurement_time = mosaic.measurement_time
    meta.background.level = None
    meta.background.subtracted = None
    meta.cal_step.resample = "COMPLETE"
    meta.filename = out.name
    if update is not None:
        update(model)
    save_model(model, out)
    return model


def record_weight_type(model: Any, weight_type: str | None) -> None:
    """RESWHT in jwst's vocabulary (ivm / exptime; "ivm-smed" is an ivm weighting); calstream's
    exact choice in the primary keyword CSRESWHT."""
    model.meta.resample.weight_type = "ivm" if weight_type == "ivm-smed" else weight_type
    header = model.instance.setdefault("extra_fits", {}).setdefault("PRIMARY", {}).setdefault("header", [])
    header[:] = [row for row in header if row[0] != "CSRESWHT"]
    header.append(["CSRESWHT", str(weight_type), "calstream drizzle weighting"])


def set_grid_wcsinfo(model: Any, grid: OutputGrid) -> None:
    """The grid's exact FITS WCS in meta.wcsinfo; SIP and pointing keys of the inputs removed."""
    info = model.meta.wcsinfo.instance
    pattern = re.compile(r"^(cd[12]_[12]|[ab]p?_\d_\d|[ab]p?_order|sipmxerr|sipivmxerr)$")
    for key in [k for k in info if pattern.match(k)]:
        del info[key]
    for key in ("v2_ref", "v3_ref", "ra_ref", "dec_ref", "roll_ref", "v3yangle", "vparity"):
        info.pop(key, None)
    for key, value in grid.fits_wcsinfo().items():
        setattr(model.meta.wcsinfo, key, value)


def resample_cal_file(cal: str | Path, out: str | Path, p: Mapping[str, Any],
                      update: Callable[[Any], None] | None = None) -> Path:
    """calwebb_image2's resample: one cal image onto its own grid, written as ``out`` (i2d)."""
    info = read_cal_info(cal)
    arrays = read_cal_arrays(cal, info.shape)
    flag_invalid(arrays)
    grid = grid_from_parameters([info.wcs], info.reference, info.shape, p)
    mosaic = resample_all([(resample_input(info, arrays), None)], grid, 1, p)
    del arrays
    write_i2d(mosaic, cal, out, p, update).close()
    return Path(out)


__all__ = ["UNSUPPORTED", "accumulator", "check_parameters", "grid_from_parameters", "parameter_pair", "resample_all", "resample_cal_file",
           "set_grid_wcsinfo", "write_i2d"]
