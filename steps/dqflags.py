"""JWST data-quality bit flags and conversions between DQ conventions.

PIXELDQ / DQ arrays are uint32 bit masks; GROUPDQ is uint8 and only carries bits 0-7.
Values follow stdatamodels' ``dqflags.pixel`` (value = 2**bit).
"""

from __future__ import annotations

import functools
from typing import Iterable, Mapping

import numpy as np

BIT_NAMES: tuple[str, ...] = (
    "DO_NOT_USE", "SATURATED", "JUMP_DET", "DROPOUT", "OUTLIER", "PERSISTENCE",
    "AD_FLOOR", "CHARGELOSS", "RESERVED", "NON_SCIENCE", "DEAD", "HOT", "WARM",
    "LOW_QE", "RC", "TELEGRAPH", "NONLINEAR", "BAD_REF_PIXEL", "NO_FLAT_FIELD",
    "NO_GAIN_VALUE", "NO_LIN_CORR", "NO_SAT_CHECK", "UNRELIABLE_BIAS",
    "UNRELIABLE_DARK", "UNRELIABLE_SLOPE", "UNRELIABLE_FLAT", "OPEN", "ADJ_OPEN",
    "FLUX_ESTIMATED", "MSA_FAILED_OPEN", "OTHER_BAD_PIXEL", "REFERENCE_PIXEL",
)

#: name -> value for pixel DQ (uint32).
PIXEL: dict[str, int] = {name: 1 << bit for bit, name in enumerate(BIT_NAMES)}
PIXEL["GOOD"] = 0
#: name -> value for group DQ (uint8): the first eight bits only.
GROUP: dict[str, int] = {name: 1 << bit for bit, name in enumerate(BIT_NAMES[:8])}
GROUP["GOOD"] = 0

DO_NOT_USE = PIXEL["DO_NOT_USE"]
SATURATED = PIXEL["SATURATED"]
JUMP_DET = PIXEL["JUMP_DET"]
DROPOUT = PIXEL["DROPOUT"]
OUTLIER = PIXEL["OUTLIER"]
CHARGELOSS = PIXEL["CHARGELOSS"]
DEAD = PIXEL["DEAD"]
HOT = PIXEL["HOT"]
WARM = PIXEL["WARM"]
NONLINEAR = PIXEL["NONLINEAR"]
NO_FLAT_FIELD = PIXEL["NO_FLAT_FIELD"]
NO_GAIN_VALUE = PIXEL["NO_GAIN_VALUE"]
NO_LIN_CORR = PIXEL["NO_LIN_CORR"]
NO_SAT_CHECK = PIXEL["NO_SAT_CHECK"]
UNRELIABLE_BIAS = PIXEL["UNRELIABLE_BIAS"]
UNRELIABLE_DARK = PIXEL["UNRELIABLE_DARK"]
UNRELIABLE_SLOPE = PIXEL["UNRELIABLE_SLOPE"]
UNRELIABLE_FLAT = PIXEL["UNRELIABLE_FLAT"]
REFERENCE_PIXEL = PIXEL["REFERENCE_PIXEL"]


class DQError(ValueError):
    """A DQ flag specification that names no known flag."""


def interpret_flags(spec: int | str | Iterable[str] | None) -> int:
    """Turn a DQ specification into a bit mask.

    Accepts an int, ``"12"``, ``"4+8"``, ``"JUMP_DET, DROPOUT"``, ``"~DO_NOT_USE"`` is not
    supported (raises), or an iterable of names. ``None`` and ``""`` mean 0.
    """
    if spec is None:
        return 0
    if isinstance(spec, (int, np.integer)):
        return int(spec)
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.replace("+", ",").replace("|", ",").split(",")]
    else:
        parts = [str(p).strip() for p in spec]
    mask = 0
    for part in filter(None, parts):
        if part.isdigit():
            mask |= int(part)
        elif part.upper() in PIXEL:
            mask |= PIXEL[part.upper()]
        else:
            raise DQError(f"unknown DQ flag {part!r} in {spec!r}")
    return mask


def dq_def_mapping(dq_def: Iterable[Mapping[str, object]] | None) -> dict[int, int]:
    """Map a reference file's DQ_DEF rows (BIT/VALUE, NAME) to pipeline flag values.

    Returns ``{file_bit_value: pipeline_value}``; names that are not standard map to 0
    (ignored), as jwst does.
    """
    mapping: dict[int, int] = {}
    for row in dq_def or ():
        value = int(row["VALUE"]) if "VALUE" in row else 1 << int(row["BIT"])
        name = str(row["NAME"]).strip().upper()
        mapping[value] = PIXEL.get(name, 0)
    return mapping


def translate_reference_dq(dq: np.ndarray, dq_def: Iterable[Mapping[str, object]] | None) -> np.ndarray:
    """Translate a reference DQ array (file bits) to pipeline bits, as uint32.

    Without a DQ_DEF table the file is assumed to use the pipeline's own bits already.
    """
    dq = np.asarray(dq).astype(np.uint32, copy=False)
    mapping = dq_def_mapping(dq_def)
    if not mapping or all(k == v for k, v in mapping.items()):
        return dq
    tables = _byte_tables(tuple(sorted(mapping.items())))
    if dq.size >= _COMPILED_MIN:
        from ._decode import translate_bytes  # noqa: PLC0415 - numba only for big arrays

        dq = np.ascontiguousarray(dq)
        out = np.empty_like(dq)
        translate_bytes(dq.ravel(), tables, out.ravel())
        return out
    out = tables[0][dq & 0xFF]
    for k in range(1, 4):
        out |= tables[k][(dq >> np.uint32(8 * k)) & 0xFF]
    return out


#: from this many values on, the compiled one-pass translation is used
_COMPILED_MIN = 65536


@functools.lru_cache(maxsize=64)
def _byte_tables(mapping: tuple[tuple[int, int], ...]) -> np.ndarray:
    """(4, 256) uint32 tables: byte k of a file DQ value -> the pipeline flags its bits mean."""
    tables = np.zeros((4, 256), dtype=np.uint32)
    values = np.arange(256, dtype=np.uint32)
    for file_value, pipe_value in mapping:
        for k in range(4):
            byte = (file_value >> (8 * k)) & 0xFF
            if byte and pipe_value:
                tables[k][(values & np.uint32(byte)) != 0] |= np.uint32(pipe_value)
    tables.flags.writeable = False
    return tables


def names_of(value: int) -> list[str]:
    """The flag names set in ``value`` (for messages and tests)."""
    return [name for bit, name in enumerate(BIT_NAMES) if value & (1 << bit)]
