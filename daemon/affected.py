"""Which exposures a CRDS context change affects, and from which stage they must be redone.

Pure computation over ledger records (:class:`calstream.daemon.ledger.ExposureRecord`); the only
I/O is the crds library reading mappings from the local cache.

For every stage an exposure has current products of, the reference types that stage used (the
``R_*`` types its products record, plus every ``pars-*`` type of the stage's pipeline) are
selected under the old and the new context; the exposure is affected when any selection differs,
and is redone from the earliest stage using a changed type (detector1 < image2 < image3).
Associations holding an affected exposure re-run stage 3 after their members.

Speed: ``crds.diff`` of the two contexts is a cheap pre-filter (only the instruments/types whose
rules changed are evaluated at all); records are then grouped by every parameter the relevant
rmaps select on, observation date-times bucketed between the rmaps' UseAfter dates, and each
group is evaluated once (10,000 exposures: well under a second on the synthetic rules; see
``bench/bench_affected.py``).
"""

from __future__ import annotations

import bisect
import datetime as _dt
import functools
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from .ledger import STAGES, ExposureRecord

INSTRUMENT_KEY = "META.INSTRUMENT.NAME"
DATE_KEY, TIME_KEY = "META.OBSERVATION.DATE", "META.OBSERVATION.TIME"
NOT_APPLICABLE = "N/A"
_MISSING = "\x00missing"


class ReferenceChange(NamedTuple):
    """One reference type whose best file differs: (reftype, old file, new file)."""

    reftype: str
    old: str
    new: str


@dataclass(frozen=True)
class Affected:
    """An exposure a context change affects: where to restart, what changed, which associations
    must re-run stage 3 after it."""

    exposure_id: int
    stem: str
    restart_stage: str
    changes: tuple[ReferenceChange, ...]
    associations: tuple[int, ...]


class ContextError(RuntimeError):
    """A context cannot be read from the local CRDS cache."""


def normalize_context(name: str) -> str:
    """``jwst_0002`` / ``jwst_0002.pmap`` / a path -> ``jwst_0002.pmap``."""
    base = str(name).strip().rsplit("/", 1)[-1]
    return base if base.endswith(".pmap") else base + ".pmap"


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------

def affected_exposures(records: Iterable[ExposureRecord], old_context: str | None,
                       new_context: str) -> list[Affected]:
    """Exposures whose references differ between ``old_context`` and ``new_context``.

    ``old_context=None`` compares each stage against the context its current products were
    made with (what the daemon does: stages already redone under ``new_context`` are skipped).
    Exposures without products are never affected (their pending jobs run under the new
    context anyway). Sorted by exposure id.
    """
    new_context = normalize_context(new_context)
    units = list(_units(records, old_context))
    changed = evaluate_units(units, new_context)
    by_record: dict[int, tuple[ExposureRecord, dict[str, list[ReferenceChange]]]] = {}
    for unit, changes in zip(units, changed):
        if changes:
            by_record.setdefault(unit.record.exposure_id, (unit.record, {}))[1][unit.stage] = changes
    out = []
    for record, stages in by_record.values():
        restart = min(stages, key=STAGES.index)
        merged: dict[str, ReferenceChange] = {}
        for stage in sorted(stages, key=STAGES.index):
            for change in stages[stage]:
                merged.setdefault(change.reftype, change)
        out.append(Affected(record.exposure_id, record.stem, restart, tuple(merged[k] for k in sorted(merged)),
                            tuple(record.association_ids)))
    return sorted(out, key=lambda a: a.exposure_id)


def affected_associations(affected: Iterable[Affected]) -> list[int]:
    """Ledger ids of the associations that hold at least one affected exposure."""
    return sorted({a for item in affected for a in item.associations})


def stage_reftypes(record: ExposureRecord) -> dict[str, set[str]]:
    """Per stage with current products: the reference types it used (lower case).

    The types its products record (``R_*``: only the steps that ran), plus every ``pars-*`` type
    of the stage (parameter references count whether or not a step ran). A stage whose products
    recorded no references falls back to every type its pipeline may use.
    """
    return {stage: set(types) for stage, types in _stage_types(record).items()}


def _stage_types(record: ExposureRecord) -> dict[str, frozenset[str]]:
    out: dict[str, frozenset[str]] = {}
    for stage in STAGES:
        use = record.stages.get(stage)
        if use is not None:
            out[stage] = _used_types(tuple(record.reftypes.get(stage, ())), tuple(use.references))
    return out


@functools.lru_cache(maxsize=1024)
def _used_types(possible: tuple[str, ...], used: tuple[str, ...]) -> frozenset[str]:
    """What :func:`stage_reftypes` computes for one stage (cached: records share a few layouts)."""
    pipeline = {t.lower() for t in possible}
    recorded = {t.lower() for t in used}
    return frozenset((recorded | {t for t in pipeline if t.startswith("pars-")}) if recorded else pipeline)


# ---------------------------------------------------------------------------------------------
# Evaluation units: one (exposure, stage) against one old context
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """One stage of one exposure, to compare between ``old_context`` and the new context."""

    record: ExposureRecord
    stage: str
    old_context: str
    reftypes: frozenset[str]

    @property
    def params(self) -> Mapping[str, Any]:
        return self.record.crds_parameters


def _units(records: Iterable[ExposureRecord], old_context: str | None) -> Iterable[Unit]:
    fixed = normalize_context(old_context) if old_context else None
    for record in records:
        for stage, types in _stage_types(record).items():
            old = fixed or record.stages[stage].context
            if old and types:
                yield Unit(record, stage, normalize_context(old), types)


def evaluate_units(units: Sequence[Unit], new_context: str) -> list[list[ReferenceChange]]:
    """The reference changes of every unit (``[]``: unaffected), same order as ``units``."""
    out: list[list[ReferenceChange]] = [[] for _ in units]
    by_old: dict[str, list[int]] = defaultdict(list)
    for i, unit in enumerate(units):
        if unit.old_context != new_context:
            by_old[unit.old_context].append(i)
    for old, indices in by_old.items():
        rules = _ContextPair(old, new_context)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i in indices:
            unit = units[i]
            types = rules.candidate_types(unit.params, unit.reftypes)
            if types:
                groups[rules.group_key(unit.params, types)].append(i)
        for key, members in groups.items():
            changes = rules.changes(units[members[0]].params, key[1])
            for i in members:
                out[i] = changes
    return out


# ---------------------------------------------------------------------------------------------
# Rules of two contexts
# ---------------------------------------------------------------------------------------------

class _ContextPair:
    """Pre-filter, grouping keys and selections for one (old, new) context pair."""

    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new
        self._crds = _crds()
        self.affected = self._affected_types()
        self._selection: dict[tuple[str, frozenset[str]], tuple[tuple[str, ...], list[_dt.datetime] | None]] = {}

    def _affected_types(self) -> dict[str, set[str]]:
        """{instrument: {reftype}} whose rules differ (crds.diff); contexts are checked loadable."""
        from crds import diff as crds_diff  # noqa: PLC0415

        for name in (self.old, self.new):
            self._mapping(name)
        try:
            found = crds_diff.get_affected(self.old, self.new, observatory="jwst")
        except Exception as exc:  # crds raises many types for broken mappings
            raise ContextError(f"crds.diff {self.old} -> {self.new} failed: {exc}") from exc
        return {instr.lower(): {t.lower() for t in types} for instr, types in found.items()}

    def _mapping(self, name: str) -> Any:
        from crds.core import rmap  # noqa: PLC0415

        try:
            return rmap.get_cached_mapping(name)
        except Exception as exc:
            raise ContextError(f"CRDS context {name} cannot be loaded from the local cache "
                               f"({type(exc).__name__}: {exc})") from exc

    def candidate_types(self, params: Mapping[str, Any], reftypes: frozenset[str]) -> frozenset[str]:
        """The unit's types whose rules changed for its instrument."""
        instrument = str(params.get(INSTRUMENT_KEY, "")).lower()
        changed = self.affected.get(instrument)
        return reftypes & changed if changed else frozenset()

    def _selection_spec(self, instrument: str, types: frozenset[str]
                        ) -> tuple[tuple[str, ...], list[_dt.datetime] | None]:
        """(match parkeys, sorted UseAfter boundaries or None when dates cannot be bucketed) of
        the rmaps of ``types`` in both contexts."""
        key = (instrument, types)
        if key not in self._selection:
            parkeys: set[str] = set()
            dates: set[_dt.datetime] | None = set()
            for name in (self.old, self.new):
                try:
                    imap = self._mapping(name).get_imap(instrument)
                except Exception:
                    continue        # instrument absent from this context: nothing to select
                for reftype in types:
                    try:
                        rmap_ = imap.get_rmap(reftype)
                    except Exception:
                        continue    # N/A or omitted in this context
                    parkeys.update(rmap_.get_required_parkeys())
                    dates = _collect_dates(rmap_.selector, dates)
            parkeys.discard(DATE_KEY)
            parkeys.discard(TIME_KEY)
            self._selection[key] = (tuple(sorted(parkeys)), None if dates is None else sorted(dates))
        return self._selection[key]

    def group_key(self, params: Mapping[str, Any], types: frozenset[str]) -> tuple:
        """Units with equal keys select equal files under both contexts."""
        instrument = str(params.get(INSTRUMENT_KEY, "")).lower()
        parkeys, dates = self._selection_spec(instrument, types)
        values = tuple(_value(params, k) for k in parkeys)
        return (instrument, types, values, _date_bucket(params, dates))

    def changes(self, params: Mapping[str, Any], types: frozenset[str]) -> list[ReferenceChange]:
        """Reference changes of ``types`` for one parameter set."""
        wanted = sorted(types)
        old, new = self._best(params, wanted, self.old), self._best(params, wanted, self.new)
        return [ReferenceChange(t, old[t], new[t]) for t in wanted if old[t] != new[t]]

    def _best(self, params: Mapping[str, Any], types: list[str], context: str) -> dict[str, str]:
        try:
            found = self._crds.getrecommendations(dict(params), reftypes=types, context=context,
                                                  observatory="jwst", fast=True)
        except Exception as exc:
            raise ContextError(f"best references under {context} failed: {exc}") from exc
        return {t: _file_name(found.get(t, NOT_APPLICABLE)) for t in types}


def _collect_dates(selector: Any, dates: set[_dt.datetime] | None) -> set[_dt.datetime] | None:
    """Add the UseAfter dates below ``selector``; None when a date-dependent selector other than
    UseAfter is found (then dates are not bucketed)."""
    from crds.core import selectors  # noqa: PLC0415

    if dates is None or not isinstance(selector, selectors.Selector):
        return dates
    name = type(selector).__name__
    if name == "UseAfterSelector":
        for when, choice in selector._raw_selections:  # noqa: SLF001 - crds has no public accessor
            parsed = _parse_datetime(str(when))
            if parsed is None:
                return None
            dates.add(parsed)
            dates = _collect_dates(choice, dates)
        return dates
    if name not in ("MatchSelector",):
        return None
    for _, choice in selector._raw_selections:  # noqa: SLF001
        dates = _collect_dates(choice, dates)
        if dates is None:
            return None
    return dates


def _date_bucket(params: Mapping[str, Any], dates: list[_dt.datetime] | None) -> Any:
    """How many UseAfter boundaries the observation is at or after (its raw date-time when it
    cannot be parsed or the rules are not pure UseAfter)."""
    raw = (str(params.get(DATE_KEY, _MISSING)), str(params.get(TIME_KEY, _MISSING)))
    if dates is None:
        return raw
    when = _parse_datetime(f"{raw[0]} {raw[1]}")
    return raw if when is None else bisect.bisect_right(dates, when)


def _parse_datetime(text: str) -> _dt.datetime | None:
    try:
        return _dt.datetime.fromisoformat(text.strip())
    except ValueError:
        return None


def _value(params: Mapping[str, Any], key: str) -> str:
    value = params.get(key, _MISSING)
    return value if isinstance(value, str) else repr(value)


def _file_name(value: Any) -> str:
    text = str(value)
    if text.upper().startswith(("N/A", "NOT FOUND N/A")):
        return NOT_APPLICABLE
    return text.rsplit("/", 1)[-1]


def _crds() -> Any:
    from calstream.steps.crdsrefs import _crds as load  # noqa: PLC0415 - sets the offline environment first

    return load()


__all__ = ["Affected", "ContextError", "ReferenceChange", "Unit", "affected_associations", "affected_exposures",
           "evaluate_units", "normalize_context", "stage_reftypes"]
