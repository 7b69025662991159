"""A local, serverless CRDS cache with real JWST mappings for the synthetic references.

Layout (see docs/crds-offline.md): ``config/jwst/server_config``, ``mappings/jwst/*.pmap
*.imap *.rmap`` and ``references/jwst/<instrument>/``.  Mappings are written in crds' own
text format with correct ``sha1sum`` headers, so the real ``crds`` library loads and
selects from them.

Rules are declarative: a context is a list of :class:`RuleRow` ``(reftype, match tuple,
useafter, filename)``; :func:`write_contexts` turns a series of such lists into versioned
pmaps/imaps/rmaps (an rmap or imap only gets a new version when its content changes, as
in real CRDS).  Stage-2 reference types are added by appending rows (and, for a new
reftype, a :class:`RefTypeSpec`).

:func:`build_crds_cache` creates the synthetic NIRCam cache used by calstream's tests:
``jwst_0001.pmap`` and ``jwst_0002.pmap`` where 0002 adds a new gain file for one
detector for observations after a date (``detector.GAIN_CHANGE``).  On request
(``reprocessing_contexts=True``) two more follow, for the re-processing tests:
``jwst_0003.pmap`` replaces the flat of one filter (:data:`REPROCESS_FLAT_FILTER`) on every
SHORT-channel detector, ``jwst_0004.pmap`` adds a photom rule row that selects the same file
as before (rules change, no exposure's references do).  :func:`sync_operational_context`
switches the operational context as ``crds sync`` does (rewrites ``server_config``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import sys
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .detector import (DETECTORS, GAIN_CHANGE, DetectorParams, GainChange, ReadPattern,
                       pixel_maps, subarray_for)
from .stage2 import (IMAGE2_NA_TYPES, STAGE2_PARKEYS, detector_filters, stage2_name, write_flat,
                     write_stage2_references)
from .references import (PARS_REFERENCES, UNDERSAMPLED_FILTERS, RefRecipe, existing_recipe_key, pars_name,
                         reference_name, write_pars, write_reference)

OBSERVATORY = "jwst"
INSTRUMENT_DIRS = ("fgs", "miri", "nircam", "niriss", "nirspec", "system")
DATE_PARKEYS = ("META.OBSERVATION.DATE", "META.OBSERVATION.TIME")
DET = "META.INSTRUMENT.DETECTOR"
SUB = "META.SUBARRAY.NAME"
TSO = "META.VISIT.TSOVISIT"
MANIFEST = "calstream_synth.json"
#: version of the stage-2 reference recipes (written only when missing otherwise): a cache built
#: with another version gets its stage-2 files rewritten (2: flats measure the detector's response)
STAGE2_RECIPE = 2
USEAFTER = "2022-01-01 00:00:00"
PARS_USEAFTER = "1900-01-01 00:00:00"


# --------------------------------------------------------------------------------------
# Declarative rules
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RuleRow:
    """One rmap selection: ``match`` values (one per match parkey), a UseAfter date
    ('YYYY-MM-DD HH:MM:SS') and the reference basename."""

    reftype: str
    match: tuple[str, ...]
    useafter: str
    filename: str
    instrument: str = "nircam"


@dataclass(frozen=True)
class RefTypeSpec:
    """How a reference type is selected: its Match parkeys (the UseAfter parkeys are
    always META.OBSERVATION.DATE/TIME) and the file extension."""

    parkeys: tuple[str, ...]
    file_ext: str = ".fits"
    text_descr: str = ""


#: (instrument, reftype) specs; extend for new types (e.g. stage-2 distortion/flat/photom).
REFTYPE_SPECS: dict[tuple[str, str], RefTypeSpec] = {
    ("nircam", "mask"): RefTypeSpec((DET, SUB), ".fits", "Bad Pixel Mask"),
    ("nircam", "saturation"): RefTypeSpec((DET, SUB), ".fits", "Saturation"),
    ("nircam", "superbias"): RefTypeSpec((DET, SUB), ".fits", "Super Bias"),
    ("nircam", "linearity"): RefTypeSpec((DET, SUB), ".fits",
                                         "Detector Linearity Correction Coefficients"),
    ("nircam", "dark"): RefTypeSpec((DET, SUB), ".fits", "Dark reference"),
    ("nircam", "gain"): RefTypeSpec((DET, SUB), ".fits", "Gain"),
    ("nircam", "readnoise"): RefTypeSpec((DET, SUB), ".fits", "Read Noise"),
    ("nircam", "pars-detector1pipeline"): RefTypeSpec(
        (TSO,), ".asdf", "Step parameters for Detector1Pipeline"),
    ("nircam", "pars-jumpstep"): RefTypeSpec((), ".asdf", "JumpStep runtime parameters"),
    ("nircam", "pars-outlierdetectionstep"): RefTypeSpec(
        ("META.EXPOSURE.TYPE", "META.INSTRUMENT.FILTER", "META.INSTRUMENT.PUPIL"), ".asdf",
        "OutlierDetectionStep parameters"),
}

#: calwebb_image2 reference types written by :mod:`.stage2`
STAGE2_SPECS: dict[tuple[str, str], RefTypeSpec] = {
    ("nircam", reftype): RefTypeSpec(parkeys, ".asdf" if reftype in ("distortion", "filteroffset") else ".fits",
                                     reftype)
    for reftype, parkeys in STAGE2_PARKEYS.items()}

#: Reference types Detector1Pipeline asks CRDS for on a NIRCam image that the synthetic
#: cache declares N/A (jwst then skips the step / uses step defaults).
DETECTOR1_NA_TYPES: tuple[str, ...] = (
    "ipc", "refpix", "sirskernel", "persat", "trapdensity", "trappars", "pictureframe",
    "flat", "pastasoss", "rscd", "reset", "emicorr",
    "pars-groupscalestep", "pars-dqinitstep", "pars-emicorrstep", "pars-saturationstep",
    "pars-ipcstep", "pars-superbiasstep", "pars-refpixstep", "pars-rscdstep",
    "pars-firstframestep", "pars-lastframestep", "pars-linearitystep",
    "pars-darkcurrentstep", "pars-resetstep", "pars-persistencestep",
    "pars-chargemigrationstep", "pars-pictureframestep", "pars-cleanflickernoisestep",
    "pars-rampfitstep", "pars-gainscalestep",
)


# --------------------------------------------------------------------------------------
# Mapping text
# --------------------------------------------------------------------------------------

def mapping_checksum(text: str) -> str:
    """crds' mapping checksum: sha1 of the UTF-8 text without lines containing 'sha1sum'."""
    kept = "".join(line for line in text.splitlines(True) if "sha1sum" not in line)
    return hashlib.sha1(kept.encode("utf-8")).hexdigest()


def _with_checksum(text: str) -> str:
    return text.replace("'sha1sum' : '@@SHA1@@'", f"'sha1sum' : '{mapping_checksum(text)}'")


def _header(items: Mapping[str, object]) -> str:
    lines = ["header = {"]
    for key in sorted(items):
        lines.append(f"    {key!r} : {items[key]!r},")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _fmt_key(match: tuple[str, ...]) -> str:
    if len(match) == 1:
        return f"({match[0]!r},)"
    return "(" + ", ".join(repr(m) for m in match) + ")"


def format_rmap(name: str, instrument: str, reftype: str, spec: RefTypeSpec,
                rows: Sequence[RuleRow], derived_from: str = "calstream synthetic") -> str:
    """Text of a Match/UseAfter rmap with a valid sha1sum."""
    groups: OrderedDict[tuple[str, ...], dict[str, str]] = OrderedDict()
    for row in sorted(rows, key=lambda r: (r.match, r.useafter)):
        if len(row.match) != len(spec.parkeys):
            raise ValueError(f"{reftype}: match {row.match} does not fit parkeys {spec.parkeys}")
        groups.setdefault(tuple(row.match), {})[row.useafter] = row.filename
    header = {
        "classes": ("Match", "UseAfter"),
        "derived_from": derived_from,
        "file_ext": spec.file_ext,
        "filekind": reftype.upper(),
        "filetype": reftype.upper(),
        "instrument": instrument.upper(),
        "mapping": "REFERENCE",
        "name": name,
        "observatory": "JWST",
        "parkey": (tuple(spec.parkeys), DATE_PARKEYS),
        "sha1sum": "@@SHA1@@",
        "suffix": reftype,
        "text_descr": spec.text_descr or reftype,
    }
    lines = [_header(header), "selector = Match({"]
    for match, useafters in groups.items():
        lines.append(f"    {_fmt_key(match)} : UseAfter({{")
        for date in sorted(useafters):
            lines.append(f"        {date!r} : {useafters[date]!r},")
        lines.append("    }),")
    lines.append("})")
    return _with_checksum("\n".join(lines) + "\n")


def format_imap(name: str, instrument: str, selections: Mapping[str, str],
                derived_from: str = "calstream synthetic") -> str:
    """Text of an instrument context: reftype -> rmap name or 'N/A'."""
    header = {
        "derived_from": derived_from,
        "file_ext": ".fits",
        "instrument": instrument.upper(),
        "mapping": "INSTRUMENT",
        "name": name,
        "observatory": "JWST",
        "parkey": ("REFTYPE",),
        "sha1sum": "@@SHA1@@",
    }
    lines = [_header(header), "selector = {"]
    for reftype in sorted(selections):
        lines.append(f"    {reftype.upper()!r} : {selections[reftype]!r},")
    lines.append("}")
    return _with_checksum("\n".join(lines) + "\n")


def format_pmap(name: str, selections: Mapping[str, str],
                derived_from: str = "calstream synthetic") -> str:
    """Text of a pipeline context: instrument -> imap name."""
    header = {
        "derived_from": derived_from,
        "mapping": "PIPELINE",
        "name": name,
        "observatory": "JWST",
        "parkey": ("META.INSTRUMENT.NAME",),
        "sha1sum": "@@SHA1@@",
    }
    lines = [_header(header), "selector = {"]
    for instrument in sorted(selections):
        lines.append(f"    {instrument.upper()!r} : {selections[instrument]!r},")
    lines.append("}")
    return _with_checksum("\n".join(lines) + "\n")


def _body(text: str) -> str:
    """Mapping text without the lines that legitimately differ between versions."""
    return "".join(line for line in text.splitlines(True)
                   if not any(k in line for k in ("'name'", "sha1sum", "'derived_from'")))


def _write_text(path: Path, text: str) -> None:
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_contexts(root: str | os.PathLike, contexts: Sequence[Sequence[RuleRow]],
                   na_types: Mapping[str, Iterable[str]] | None = None,
                   specs: Mapping[tuple[str, str], RefTypeSpec] | None = None) -> list[str]:
    """Write pmaps ``jwst_0001.pmap`` .. for a series of rule lists; return their names.

    Context ``i`` selects from ``contexts[i]``; reftypes in ``na_types[instrument]`` without
    rows map to 'N/A'.  An rmap/imap keeps its previous version number when unchanged.
    """
    mapdir = Path(root) / "mappings" / OBSERVATORY
    mapdir.mkdir(parents=True, exist_ok=True)
    specs = {**REFTYPE_SPECS, **(specs or {})}
    na_types = {k.lower(): tuple(v) for k, v in (na_types or {}).items()}
    last_rmap: dict[tuple[str, str], tuple[str, str]] = {}   # -> (name, body)
    last_imap: dict[str, tuple[str, str]] = {}
    pmaps = []
    prev_pmap = "calstream synthetic"
    for number, rules in enumerate(contexts, start=1):
        by_type: dict[tuple[str, str], list[RuleRow]] = {}
        for row in rules:
            by_type.setdefault((row.instrument.lower(), row.reftype.lower()), []).append(row)
        instruments = sorted({i for i, _ in by_type} | set(na_types))
        imap_names = {}
        for instr in instruments:
            selections: dict[str, str] = {rt: "N/A" for rt in na_types.get(instr, ())}
            for (i, reftype), rows in sorted(by_type.items()):
                if i != instr:
                    continue
                spec = specs[(i, reftype)]
                prev = last_rmap.get((i, reftype))
                version = 1 if prev is None else int(prev[0].rsplit("_", 1)[1][:4])
                name = f"jwst_{i}_{reftype}_{version:04d}.rmap"
                text = format_rmap(name, i, reftype, spec, rows)
                if prev is not None and _body(text) != prev[1]:
                    derived = prev[0]
                    name = f"jwst_{i}_{reftype}_{version + 1:04d}.rmap"
                    text = format_rmap(name, i, reftype, spec, rows, derived_from=derived)
                elif prev is not None:
                    name = prev[0]
                    text = (mapdir / name).read_text()
                _write_text(mapdir / name, text)
                last_rmap[(i, reftype)] = (name, _body(text))
                selections[reftype] = name
            prev = last_imap.get(instr)
            version = 1 if prev is None else int(prev[0].rsplit("_", 1)[1][:4])
            name = f"jwst_{instr}_{version:04d}.imap"
            text = format_imap(name, instr, selections)
            if prev is not None and _body(text) != prev[1]:
                name = f"jwst_{instr}_{version + 1:04d}.imap"
                text = format_imap(name, instr, selections, derived_from=prev[0])
            elif prev is not None:
                name = prev[0]
                text = (mapdir / name).read_text()
            _write_text(mapdir / name, text)
            last_imap[instr] = (name, _body(text))
            imap_names[instr] = name
        pmap = f"jwst_{number:04d}.pmap"
        _write_text(mapdir / pmap, format_pmap(pmap, imap_names, derived_from=prev_pmap))
        prev_pmap = pmap
        pmaps.append(pmap)
    return pmaps


# --------------------------------------------------------------------------------------
# Cache layout and server_config
# --------------------------------------------------------------------------------------

def ensure_layout(root: str | os.PathLike) -> Path:
    """Create the directory tree of a CRDS cache (all instrument reference dirs)."""
    root = Path(root)
    (root / "config" / OBSERVATORY).mkdir(parents=True, exist_ok=True)
    (root / "mappings" / OBSERVATORY).mkdir(parents=True, exist_ok=True)
    for instr in INSTRUMENT_DIRS:
        (root / "references" / OBSERVATORY / instr).mkdir(parents=True, exist_ok=True)
    cfg = root / "config" / OBSERVATORY
    _write_text(cfg / "ref_cache_subdir_mode", "instrument\n")
    if not (cfg / "bad_files.txt").exists():
        _write_text(cfg / "bad_files.txt", "")
    return root


def write_server_config(root: str | os.PathLike, contexts: Sequence[str],
                        operational: str | None = None) -> Path:
    """Atomically (re)write ``config/jwst/server_config`` (operational = latest by default)."""
    operational = operational or contexts[-1]
    cfg = {
        "observatory": OBSERVATORY,
        "operational_context": operational,
        "latest_context": operational,
        "edit_context": operational,
        "mappings": list(contexts),
        "bad_files_list": [],
        "last_synced": _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        "force_remote_mode": False,
        "calibration_software_version": "calstream-synthetic",
    }
    path = Path(root) / "config" / OBSERVATORY / "server_config"
    tmp = path.with_name(f".server_config.{os.getpid()}.tmp")
    tmp.write_text(repr(cfg) + "\n")
    os.replace(tmp, path)
    return path


def sync_operational_context(root: str | os.PathLike, context: str) -> Path:
    """Make ``context`` the operational (and latest/edit) context of the cache at ``root``, as
    ``crds sync`` does when the server announces a new one: ``server_config`` is rewritten
    atomically, the context appended to ``mappings``; the pmap must already be in the cache."""
    import ast  # noqa: PLC0415

    mapdir = Path(root) / "mappings" / OBSERVATORY
    if not (mapdir / context).is_file():
        raise FileNotFoundError(f"{mapdir / context}: no such context in the cache")
    path = Path(root) / "config" / OBSERVATORY / "server_config"
    contexts = list(ast.literal_eval(path.read_text()).get("mappings", [])) if path.exists() else []
    if context not in contexts:
        contexts.append(context)
    return write_server_config(root, contexts, operational=context)


def clear_crds_caches() -> None:
    """Drop crds' in-process caches of config and mappings (if crds is imported)."""
    if "crds" in sys.modules:
        from crds.core import utils as crds_utils
        crds_utils.clear_function_caches()


@contextmanager
def pinned_crds_env(root: str | os.PathLike, context: str) -> Iterator[None]:
    """CRDS_PATH=root and CRDS_CONTEXT=context for the duration (jwst reads the environment);
    the previous values and crds' caches are restored/cleared afterwards."""
    saved = {k: os.environ.get(k) for k in ("CRDS_PATH", "CRDS_CONTEXT")}
    os.environ["CRDS_PATH"], os.environ["CRDS_CONTEXT"] = str(root), context
    clear_crds_caches()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        clear_crds_caches()


# --------------------------------------------------------------------------------------
# The synthetic NIRCam cache
# --------------------------------------------------------------------------------------

@dataclass
class CacheSpec:
    """What the synthetic cache must hold (merged with what an existing cache holds)."""

    detectors: tuple[str, ...] = ("NRCA1",)
    subarrays: tuple[str, ...] = ("SUB160",)
    full_frame_references: bool = False
    dark_frames: dict[str, int] = field(default_factory=dict)   # subarray -> frames
    seed: int = 0
    filters: tuple[str, ...] = ()          # stage-2 filters beyond each detector's default
    reprocessing: bool = False             # also write contexts jwst_0003 and jwst_0004

    def merged(self, other: "CacheSpec") -> "CacheSpec":
        """Union of two specs (same seed required)."""
        if other.seed != self.seed:
            raise ValueError(f"cache built with seed {other.seed}, requested {self.seed}")
        frames = dict(other.dark_frames)
        for sub, n in self.dark_frames.items():
            frames[sub] = max(n, frames.get(sub, 0))
        return CacheSpec(
            detectors=tuple(d for d in DETECTORS if d in set(self.detectors) | set(other.detectors)),
            subarrays=tuple(sorted(set(self.subarrays) | set(other.subarrays))),
            full_frame_references=self.full_frame_references or other.full_frame_references,
            dark_frames=frames, seed=self.seed,
            filters=tuple(sorted(set(self.filters) | set(other.filters))),
            reprocessing=self.reprocessing or other.reprocessing)


@dataclass
class CrdsCacheInfo:
    """Result of :func:`build_crds_cache`."""

    root: Path
    contexts: list[str]
    operational_context: str
    references: dict[str, Path]     # basename -> path
    written: list[str]              # basenames (re)written by this call (stage-1 types and pars)
    spec: CacheSpec
    stage2_written: list[str] = field(default_factory=list)   # calwebb_image2 references written


DEFAULT_DARK_FRAMES = 10


def dark_frames_needed(pattern: ReadPattern, ngroups: int) -> int:
    """Frames a RAPID dark needs to cover ``ngroups`` of ``pattern``."""
    return pattern.total_frames(ngroups)


def synthetic_rules(spec: CacheSpec, change: GainChange = GAIN_CHANGE
                    ) -> tuple[list[RuleRow], list[RuleRow], dict[str, RefRecipe]]:
    """Rules of context 1 and 2 and the recipes of every reference file they name."""
    base: list[RuleRow] = []
    extra: list[RuleRow] = []
    recipes: dict[str, RefRecipe] = {}
    change_date = change.date.replace("T", " ")

    def add(reftype: str, det: str, ref_sub: str, match_sub: str, **kw) -> None:
        name = reference_name(reftype, det, ref_sub)
        recipes[name] = RefRecipe(reftype, det, ref_sub, spec.seed, **kw)
        base.append(RuleRow(reftype, (det, match_sub), USEAFTER, name))
        if reftype == "gain" and det == change.detector:
            name2 = reference_name(reftype, det, ref_sub, version=2)
            recipes[name2] = RefRecipe(reftype, det, ref_sub, spec.seed,
                                       useafter=change_date.replace(" ", "T"),
                                       gain_factor=change.factor)
            extra.append(RuleRow(reftype, (det, match_sub), change_date, name2))

    static = ("mask", "saturation", "superbias", "linearity", "gain", "readnoise")
    for det in spec.detectors:
        sized = set()
        if spec.full_frame_references or "FULL" in spec.subarrays:
            sized.add("FULL")
        if not spec.full_frame_references:
            sized |= {s for s in spec.subarrays if s != "FULL"}
        for ref_sub in sorted(sized):
            for reftype in static:
                add(reftype, det, ref_sub, "N/A" if ref_sub == "FULL" else ref_sub)
        for sub in spec.subarrays:
            frames = spec.dark_frames.get(sub, DEFAULT_DARK_FRAMES)
            name = reference_name("dark", det, sub)
            recipes[name] = RefRecipe("dark", det, sub, spec.seed, dark_frames=frames,
                                      dark_subarray=sub)
            base.append(RuleRow("dark", (det, sub), USEAFTER, name))
    for reftype in PARS_REFERENCES:
        for match in _pars_matches(reftype):
            base.append(RuleRow(reftype, match, PARS_USEAFTER, pars_name(reftype)))
    return base, base + extra, recipes


def _pars_matches(reftype: str) -> list[tuple[str, ...]]:
    """rmap Match tuples of a parameter reference: per undersampled imaging filter for
    pars-outlierdetectionstep, TSOVISIT=F when keyed on it, else the single empty match."""
    parkeys = REFTYPE_SPECS[("nircam", reftype)].parkeys
    if reftype == "pars-outlierdetectionstep":
        return [("NRC_IMAGE", filt, "CLEAR") for filt in UNDERSAMPLED_FILTERS]
    return [("F",)] if parkeys else [()]


def _stage2_rows(refdir: Path, spec: CacheSpec, references: dict[str, Path], written: list[str],
                 force: bool, params: DetectorParams | None = None) -> list[RuleRow]:
    """Write the calwebb_image2 references of ``spec.detectors`` (see :mod:`.stage2`); their rules."""
    before = {p.name for p in refdir.iterdir()}
    rows = write_stage2_references(refdir, spec.detectors, seed=spec.seed, force=force, params=params,
                                   filters=spec.filters)
    out = []
    for reftype, match, name in rows:
        references[name] = refdir / name
        if force or name not in before:
            written.append(name)
        out.append(RuleRow(reftype, match, USEAFTER, name))
    return out


#: the filter whose flat jwst_0003 replaces (SHORT channel); the date of jwst_0004's no-op row
REPROCESS_FLAT_FILTER = "F150W"
NOOP_USEAFTER = "2023-09-01 00:00:00"


def reprocessing_rules(rules: Sequence[RuleRow], spec: CacheSpec, refdir: Path,
                       references: dict[str, Path], written: list[str], force: bool = False,
                       params: DetectorParams | None = None) -> list[list[RuleRow]]:
    """Rules of jwst_0003 and jwst_0004 derived from ``rules`` (those of jwst_0002).

    0003: a second version of the :data:`REPROCESS_FLAT_FILTER` flat of each SHORT-channel
    detector replaces the first (same UseAfter: every date).  0004: a new photom UseAfter
    row for the first detector that selects the file it already had (no selection changes).
    New flat files are written when missing (added to ``references`` and ``written``).
    """
    replaced: dict[str, RuleRow] = {}
    for det in spec.detectors:
        if REPROCESS_FLAT_FILTER not in detector_filters(det, spec.filters):
            continue
        old = stage2_name("flat", det, REPROCESS_FLAT_FILTER)
        name = stage2_name("flat", det, REPROCESS_FLAT_FILTER, version=2)
        path = refdir / name
        if force or not path.exists():
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
            write_flat(tmp, det, REPROCESS_FLAT_FILTER, seed=spec.seed, version=2, params=params)
            os.replace(tmp, path)
            written.append(name)
        references[name] = path
        replaced[old] = RuleRow("flat", (det, REPROCESS_FLAT_FILTER, "CLEAR", "NRC_IMAGE"), USEAFTER, name)
    ctx3 = [replaced.get(row.filename, row) for row in rules]
    photom = stage2_name("photom", spec.detectors[0])
    ctx4 = ctx3 + [RuleRow("photom", (spec.detectors[0], "NRC_IMAGE"), NOOP_USEAFTER, photom)]
    return [ctx3, ctx4]


def _read_manifest(root: Path) -> CacheSpec | None:
    path = root / MANIFEST
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return CacheSpec(detectors=tuple(data["detectors"]), subarrays=tuple(data["subarrays"]),
                     full_frame_references=bool(data["full_frame_references"]),
                     dark_frames={k: int(v) for k, v in data["dark_frames"].items()},
                     seed=int(data["seed"]), filters=tuple(data.get("filters", ())),
                     reprocessing=bool(data.get("reprocessing", False)))


def _manifest_value(root: Path, key: str, default: Any) -> Any:
    return json.loads((root / MANIFEST).read_text()).get(key, default)


def _write_manifest(root: Path, spec: CacheSpec) -> None:
    data = {"detectors": list(spec.detectors), "subarrays": list(spec.subarrays),
            "full_frame_references": spec.full_frame_references,
            "dark_frames": spec.dark_frames, "seed": spec.seed,
            "filters": list(spec.filters), "reprocessing": spec.reprocessing, "stage2_recipe": STAGE2_RECIPE}
    _write_text(root / MANIFEST, json.dumps(data, indent=1, sort_keys=True) + "\n")


def build_crds_cache(root: str | os.PathLike, *, detectors: Sequence[str] = ("NRCA1",),
                     subarrays: Sequence[str] = ("SUB160",), full_frame_references: bool = False,
                     dark_frames: Mapping[str, int] | None = None, seed: int = 0,
                     extra_rules: Sequence[RuleRow] = (), params: DetectorParams | None = None,
                     force: bool = False, filters: Sequence[str] = (),
                     reprocessing_contexts: bool = False) -> CrdsCacheInfo:
    """Create or extend the synthetic CRDS cache at ``root``; idempotent. ``server_config`` is
    rewritten with the newest context operational (undoing an earlier :func:`sync_operational_context`).

    References are written only when missing or when their recipe changed (e.g. a dark
    needs more frames); the cache's content is the union of everything ever requested
    (recorded in ``root/calstream_synth.json``).  ``extra_rules`` are appended to both
    contexts (their files must already exist under references/jwst/<instrument>/).
    Dark frame counts default to 10 per subarray.  ``filters`` adds stage-2 flat/area
    references (and rules) for more filters of each detector's channel.
    ``reprocessing_contexts`` adds jwst_0003 (new flat for :data:`REPROCESS_FLAT_FILTER`) and
    jwst_0004 (a rule row that changes nothing selected); both are remembered in the manifest.
    Returns paths and context names; the operational context in ``server_config`` is the
    latest (jwst_0002.pmap, or jwst_0004.pmap with the re-processing contexts).
    """
    root = ensure_layout(root)
    want = CacheSpec(detectors=tuple(d.upper() for d in detectors),
                     subarrays=tuple(s.upper() for s in subarrays),
                     full_frame_references=full_frame_references,
                     dark_frames={k.upper(): int(v) for k, v in (dark_frames or {}).items()},
                     seed=int(seed), reprocessing=bool(reprocessing_contexts),
                     filters=tuple(sorted({f.upper() for f in filters}
                                          | ({REPROCESS_FLAT_FILTER} if reprocessing_contexts else set()))))
    for det in want.detectors:
        for sub in want.subarrays:
            subarray_for(det, sub)          # validates names
    have = _read_manifest(root)
    spec = want.merged(have) if have is not None else want.merged(want)
    ctx1, ctx2, recipes = synthetic_rules(spec)
    refdir = root / "references" / OBSERVATORY / "nircam"
    written: list[str] = []
    references: dict[str, Path] = {}
    params = params or DetectorParams()
    maps_cache: dict[tuple[str, str], object] = {}
    for name, recipe in sorted(recipes.items()):
        if params != recipe.params:
            recipe = RefRecipe(**{**recipe.__dict__, "params": params})
        path = refdir / name
        references[name] = path
        key = (recipe.detector, recipe.subarray)
        if not force and path.exists() and existing_recipe_key(path) == recipe.key():
            continue
        if key not in maps_cache:
            maps_cache.clear()   # keep at most one window's maps in memory
            sub = subarray_for(*key)
            maps_cache[key] = pixel_maps(recipe.detector, recipe.seed, sub.y0, sub.x0,
                                         sub.ysize, sub.xsize, params)
        if write_reference(recipe, path, maps=maps_cache[key], force=True):
            written.append(name)
    for reftype in PARS_REFERENCES:
        path = refdir / pars_name(reftype)
        references[path.name] = path
        if write_pars(reftype, path):
            written.append(path.name)
    stage2_written: list[str] = []
    stage2_force = force or (have is not None and _manifest_value(root, "stage2_recipe", 1) != STAGE2_RECIPE)
    stage2 = _stage2_rows(refdir, spec, references, stage2_written, stage2_force, params)
    rule_lists = [ctx1 + stage2 + list(extra_rules), ctx2 + stage2 + list(extra_rules)]
    if spec.reprocessing:
        rule_lists += reprocessing_rules(rule_lists[-1], spec, refdir, references, stage2_written, stage2_force,
                                         params)
    contexts = write_contexts(root, rule_lists,
                              na_types={"nircam": DETECTOR1_NA_TYPES + IMAGE2_NA_TYPES}, specs=STAGE2_SPECS)
    write_server_config(root, contexts)
    _write_manifest(root, spec)
    clear_crds_caches()
    return CrdsCacheInfo(root=root, contexts=contexts, operational_context=contexts[-1],
                         references=references, written=written, spec=spec,
                         stage2_written=stage2_written)


__all__ = [
    "CacheSpec", "CrdsCacheInfo", "DETECTOR1_NA_TYPES", "REFTYPE_SPECS", "RefTypeSpec",
    "RuleRow", "build_crds_cache", "clear_crds_caches", "dark_frames_needed",
    "ensure_layout", "format_imap", "format_pmap", "format_rmap", "mapping_checksum",
    "synthetic_rules", "write_contexts", "write_server_config",
    "NOOP_USEAFTER", "REPROCESS_FLAT_FILTER", "reprocessing_rules", "sync_operational_context",
]
