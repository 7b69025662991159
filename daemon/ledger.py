"""The ledger: every input, exposure, job, product version, association, error and CRDS context.

SQLite in WAL mode. One writer — the daemon's main thread — and any number of readers
(``calstream status`` opens it read-only while the daemon runs). Every state change is one
transaction; the daemon changes the ledger only *after* the files it describes are in place
(products are renamed into place by the workers before :meth:`Ledger.finish_job` records them), so
a ``kill -9`` at any moment leaves a ledger that describes files that exist. On restart,
:meth:`Ledger.recover` puts the jobs of the dead daemon back in the queue.

Job states: queued -> running -> done | failed | quarantined | skipped (queued again on a retry).
Association states: waiting -> (stuck) -> ready -> running -> done | failed | skipped.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

SCHEMA_VERSION = 1
STAGES = ("detector1", "image2", "image3")
TERMINAL_JOB_STATES = ("done", "failed", "quarantined", "skipped")
ACTIVE_JOB_STATES = ("queued", "running")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS inputs (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    kind TEXT NOT NULL,                 -- uncal | asn
    origin TEXT,
    checksum TEXT,
    size INTEGER,
    mtime_ns INTEGER,
    state TEXT NOT NULL,                -- accepted | done | failed | quarantined | duplicate
    duplicate_of INTEGER REFERENCES inputs(id),
    quarantine_path TEXT,
    arrived_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS inputs_checksum ON inputs(checksum);
CREATE INDEX IF NOT EXISTS inputs_path ON inputs(path);
CREATE TABLE IF NOT EXISTS exposures (
    id INTEGER PRIMARY KEY,
    input_id INTEGER NOT NULL UNIQUE REFERENCES inputs(id),
    path TEXT NOT NULL,
    stem TEXT NOT NULL,                 -- jw..._00001-seg001_nrca1
    exposure_name TEXT NOT NULL,        -- jw..._00001_nrca1 (segments share it)
    segment INTEGER,
    segment_total INTEGER,
    instrument TEXT, detector TEXT, exp_type TEXT,
    shape TEXT,                         -- JSON [nints, ngroups, ny, nx] of the uncal SCI
    nbytes INTEGER,
    crds_parameters TEXT,               -- JSON {"META.INSTRUMENT.NAME": ..., ...}
    pipelines TEXT,                     -- JSON {"detector1": "calwebb_detector1", ...}
    reftypes TEXT,                      -- JSON {"detector1": [...], "image2": [...]}
    output_dir TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS exposures_stem ON exposures(stem);
CREATE INDEX IF NOT EXISTS exposures_name ON exposures(exposure_name);
CREATE TABLE IF NOT EXISTS associations (
    id INTEGER PRIMARY KEY,
    asn_id TEXT NOT NULL UNIQUE,
    input_id INTEGER REFERENCES inputs(id),
    path TEXT NOT NULL,
    asn_type TEXT, asn_rule TEXT,
    product_name TEXT NOT NULL,
    state TEXT NOT NULL,
    deadline REAL,
    forced INTEGER NOT NULL DEFAULT 0,
    output_dir TEXT NOT NULL,
    note TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS association_members (
    association_id INTEGER NOT NULL REFERENCES associations(id),
    expname TEXT NOT NULL,
    exptype TEXT,
    stem TEXT NOT NULL                  -- expname without suffix and extension
);
CREATE INDEX IF NOT EXISTS members_stem ON association_members(stem);
CREATE INDEX IF NOT EXISTS members_asn ON association_members(association_id);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,                 -- exposure | association
    subject_id INTEGER NOT NULL,
    stage TEXT NOT NULL,                -- detector1 | image2 | image3
    state TEXT NOT NULL,
    lane TEXT NOT NULL DEFAULT 'live',  -- live | reprocess
    priority INTEGER NOT NULL DEFAULT 0,
    context TEXT,                       -- CRDS context to use; NULL: the daemon's current one
    reason TEXT,
    est_bytes INTEGER,
    tries INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL, finished_at REAL,
    worker_pid INTEGER,
    seconds REAL,
    error_class TEXT, error_message TEXT
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(state, lane, priority, id);
CREATE INDEX IF NOT EXISTS jobs_subject ON jobs(kind, subject_id, stage);
CREATE TABLE IF NOT EXISTS products (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    kind TEXT NOT NULL,                 -- rate | rateints | cal | i2d | cat | segm | ...
    stage TEXT NOT NULL,
    exposure_id INTEGER REFERENCES exposures(id),
    association_id INTEGER REFERENCES associations(id),
    job_id INTEGER REFERENCES jobs(id),
    crds_context TEXT,
    reference_files TEXT,               -- JSON {reftype: file name}
    cal_ver TEXT,
    version INTEGER NOT NULL,
    current INTEGER NOT NULL DEFAULT 1,
    checksum TEXT,
    size INTEGER,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS products_exposure ON products(exposure_id, stage, current);
CREATE INDEX IF NOT EXISTS products_association ON products(association_id, current);
CREATE TABLE IF NOT EXISTS errors (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    input_id INTEGER, exposure_id INTEGER, association_id INTEGER, job_id INTEGER,
    stage TEXT,
    path TEXT,
    error_class TEXT NOT NULL,
    message TEXT,
    traceback TEXT,
    outcome TEXT                        -- retry | failed | quarantined | skipped | duplicate
);
CREATE INDEX IF NOT EXISTS errors_at ON errors(at);
CREATE TABLE IF NOT EXISTS crds_contexts (
    context TEXT PRIMARY KEY,
    origin TEXT,
    first_seen REAL NOT NULL,
    seen_at REAL NOT NULL,
    active INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    command TEXT NOT NULL,
    argument TEXT,
    requested_at REAL NOT NULL,
    handled_at REAL,
    result TEXT
);
"""


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputRecord:
    id: int
    path: str
    kind: str
    origin: str | None
    checksum: str | None
    size: int | None
    mtime_ns: int | None
    state: str
    duplicate_of: int | None
    quarantine_path: str | None
    arrived_at: float
    finished_at: float | None


@dataclass(frozen=True)
class ExposureInfo:
    """What the daemon learns about an uncal file from its headers (main process, no data read)."""

    path: str
    stem: str
    exposure_name: str
    segment: int | None
    segment_total: int | None
    instrument: str
    detector: str
    exp_type: str
    shape: tuple[int, ...]
    nbytes: int
    crds_parameters: Mapping[str, Any]
    pipelines: Mapping[str, str]
    reftypes: Mapping[str, Sequence[str]]
    output_dir: str


@dataclass(frozen=True)
class ExposureRow(ExposureInfo):
    id: int = 0
    input_id: int = 0
    created_at: float = 0.0


@dataclass(frozen=True)
class JobSpec:
    """A job to queue: ``kind`` "exposure" or "association", the subject's ledger id, a stage."""

    kind: str
    subject_id: int
    stage: str
    priority: int = 0
    context: str | None = None
    reason: str | None = None
    est_bytes: int | None = None

    @classmethod
    def exposure(cls, exposure_id: int, stage: str, **kw: Any) -> "JobSpec":
        return cls("exposure", exposure_id, stage, **kw)

    @classmethod
    def association(cls, association_id: int, **kw: Any) -> "JobSpec":
        return cls("association", association_id, "image3", **kw)


@dataclass(frozen=True)
class JobRecord:
    id: int
    kind: str
    subject_id: int
    stage: str
    state: str
    lane: str
    priority: int
    context: str | None
    reason: str | None
    est_bytes: int | None
    tries: int
    not_before: float
    created_at: float
    started_at: float | None
    finished_at: float | None
    worker_pid: int | None
    seconds: float | None
    error_class: str | None
    error_message: str | None


@dataclass(frozen=True)
class ProductRecord:
    id: int
    path: str
    kind: str
    stage: str
    exposure_id: int | None
    association_id: int | None
    job_id: int | None
    crds_context: str | None
    references: dict[str, str]
    cal_ver: str | None
    version: int
    current: bool
    checksum: str | None
    size: int | None
    created_at: float


@dataclass(frozen=True)
class NewProduct:
    """A product file a job wrote (already renamed into place)."""

    path: str
    kind: str
    checksum: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class Member:
    expname: str
    exptype: str
    stem: str


@dataclass(frozen=True)
class AssociationRecord:
    id: int
    asn_id: str
    input_id: int | None
    path: str
    asn_type: str | None
    asn_rule: str | None
    product_name: str
    state: str
    deadline: float | None
    forced: bool
    output_dir: str
    note: str | None
    created_at: float
    updated_at: float
    members: tuple[Member, ...] = ()


@dataclass(frozen=True)
class StageUse:
    """What the current products of one stage of an exposure were made with."""

    context: str | None
    references: dict[str, str]
    product_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ExposureRecord:
    """One exposure as the reprocessing logic needs it."""

    exposure_id: int
    stem: str
    path: str
    crds_parameters: dict[str, Any]
    reftypes: dict[str, list[str]]
    stages: dict[str, StageUse] = field(default_factory=dict)
    association_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ErrorRecord:
    id: int
    at: float
    stage: str | None
    path: str | None
    error_class: str
    message: str | None
    outcome: str | None
    job_id: int | None


# ---------------------------------------------------------------------------------------------
# The ledger
# ---------------------------------------------------------------------------------------------

class Ledger:
    """SQLite ledger. Use from one thread; open as many read-only ledgers as you like."""

    def __init__(self, path: str | Path, *, readonly: bool = False, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(f"ledger {self.path} does not exist")
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=timeout,
                                       isolation_level=None, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        self._db.row_factory = sqlite3.Row
        self._depth = 0

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator["Ledger"]:
        """One atomic change (nested calls join the outer transaction)."""
        if self._depth == 0:
            self._db.execute("BEGIN IMMEDIATE")
        self._depth += 1
        try:
            yield self
        except BaseException:
            self._depth -= 1
            if self._depth == 0:
                self._db.execute("ROLLBACK")
            raise
        self._depth -= 1
        if self._depth == 0:
            self._db.execute("COMMIT")

    def _one(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Row | None:
        return self._db.execute(sql, args).fetchone()

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return self._db.execute(sql, args).fetchall()

    # -- inputs ---------------------------------------------------------------------------------

    def find_input(self, path: str, size: int | None, mtime_ns: int | None) -> InputRecord | None:
        """The newest input row for this path with this size and mtime (a file seen before)."""
        row = self._one("SELECT * FROM inputs WHERE path=? AND size IS ? AND mtime_ns IS ? ORDER BY id DESC",
                        (path, size, mtime_ns))
        return _input(row)

    def find_input_by_checksum(self, checksum: str) -> InputRecord | None:
        """The first input with this content that is being or was processed (accepted or done):
        content that failed or was quarantined may be delivered again to be tried again."""
        row = self._one("SELECT * FROM inputs WHERE checksum=? AND state IN ('accepted', 'done') ORDER BY id",
                        (checksum,))
        return _input(row)

    def input(self, input_id: int) -> InputRecord:
        row = _input(self._one("SELECT * FROM inputs WHERE id=?", (input_id,)))
        if row is None:
            raise KeyError(f"no input {input_id}")
        return row

    def add_input(self, path: str, kind: str, *, origin: str | None, checksum: str | None, size: int | None,
                  mtime_ns: int | None, state: str = "accepted", duplicate_of: int | None = None) -> int:
        with self.transaction():
            cur = self._db.execute(
                "INSERT INTO inputs (path, kind, origin, checksum, size, mtime_ns, state, duplicate_of, arrived_at)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                (path, kind, origin, checksum, size, mtime_ns, state, duplicate_of, time.time()))
            return int(cur.lastrowid)

    def set_input_state(self, input_id: int, state: str, *, quarantine_path: str | None = None) -> None:
        terminal = state in ("done", "failed", "quarantined", "duplicate")
        with self.transaction():
            self._db.execute(
                "UPDATE inputs SET state=?, quarantine_path=COALESCE(?, quarantine_path),"
                " finished_at=CASE WHEN ? THEN ? ELSE finished_at END WHERE id=?",
                (state, quarantine_path, terminal, time.time(), input_id))

    # -- exposures ------------------------------------------------------------------------------

    def add_exposure(self, input_id: int, info: ExposureInfo) -> int:
        with self.transaction():
            cur = self._db.execute(
                "INSERT INTO exposures (input_id, path, stem, exposure_name, segment, segment_total, instrument,"
                " detector, exp_type, shape, nbytes, crds_parameters, pipelines, reftypes, output_dir, created_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (input_id, info.path, info.stem, info.exposure_name, info.segment, info.segment_total,
                 info.instrument, info.detector, info.exp_type, json.dumps(list(info.shape)), info.nbytes,
                 json.dumps(dict(info.crds_parameters), default=str), json.dumps(dict(info.pipelines)),
                 json.dumps({k: list(v) for k, v in info.reftypes.items()}), info.output_dir, time.time()))
            return int(cur.lastrowid)

    def exposure(self, exposure_id: int) -> ExposureRow:
        row = self._one("SELECT * FROM exposures WHERE id=?", (exposure_id,))
        if row is None:
            raise KeyError(f"no exposure {exposure_id}")
        return _exposure(row)

    def exposure_for_input(self, input_id: int) -> ExposureRow | None:
        row = self._one("SELECT * FROM exposures WHERE input_id=?", (input_id,))
        return None if row is None else _exposure(row)

    def exposures_matching(self, stem: str) -> list[ExposureRow]:
        """Live (not quarantined, not duplicate) exposures whose stem, or whole-exposure name, is
        ``stem`` — newest first per stem."""
        rows = self._all(
            "SELECT e.* FROM exposures e JOIN inputs i ON i.id = e.input_id"
            " WHERE (e.stem=? OR e.exposure_name=?) AND i.state NOT IN ('quarantined', 'duplicate')"
            " ORDER BY e.id DESC", (stem, stem))
        seen: set[str] = set()
        out = []
        for row in rows:
            if row["stem"] not in seen:
                seen.add(row["stem"])
                out.append(_exposure(row))
        return out

    # -- jobs -----------------------------------------------------------------------------------

    def enqueue(self, job: JobSpec, lane: str = "reprocess") -> int:
        """Queue ``job`` unless the same (kind, subject, stage) is already queued or running:
        then that job's id is returned (moved to the live lane / higher priority if asked)."""
        if lane not in ("live", "reprocess"):
            raise ValueError(f"lane must be 'live' or 'reprocess', got {lane!r}")
        if job.stage not in STAGES:
            raise ValueError(f"unknown stage {job.stage!r}")
        with self.transaction():
            row = self._one("SELECT id, lane, priority FROM jobs WHERE kind=? AND subject_id=? AND stage=?"
                            " AND state IN ('queued', 'running') ORDER BY id DESC",
                            (job.kind, job.subject_id, job.stage))
            if row is not None:
                if lane == "live" and row["lane"] != "live" or job.priority > row["priority"]:
                    self._db.execute("UPDATE jobs SET lane=CASE WHEN ?='live' THEN 'live' ELSE lane END,"
                                     " priority=MAX(priority, ?) WHERE id=?", (lane, job.priority, row["id"]))
                return int(row["id"])
            cur = self._db.execute(
                "INSERT INTO jobs (kind, subject_id, stage, state, lane, priority, context, reason, est_bytes,"
                " created_at) VALUES (?,?,?,'queued',?,?,?,?,?,?)",
                (job.kind, job.subject_id, job.stage, lane, job.priority, job.context, job.reason,
                 job.est_bytes, time.time()))
            return int(cur.lastrowid)

    def skip(self, job: JobSpec, reason: str, lane: str = "live") -> int:
        """Record a stage that will not run (e.g. no pipeline for the EXP_TYPE) as a skipped job."""
        now = time.time()
        with self.transaction():
            cur = self._db.execute(
                "INSERT INTO jobs (kind, subject_id, stage, state, lane, priority, context, reason, created_at,"
                " finished_at, error_class, error_message) VALUES (?,?,?,'skipped',?,?,?,?,?,?,'StageSkipped',?)",
                (job.kind, job.subject_id, job.stage, lane, job.priority, job.context, reason, now, now, reason))
            return int(cur.lastrowid)

    def job(self, job_id: int) -> JobRecord:
        row = self._one("SELECT * FROM jobs WHERE id=?", (job_id,))
        if row is None:
            raise KeyError(f"no job {job_id}")
        return JobRecord(**dict(row))

    def queued_jobs(self, now: float | None = None, limit: int = 64) -> list[JobRecord]:
        """Jobs ready to run, in dispatch order: live lane first, then priority, then age."""
        now = time.time() if now is None else now
        rows = self._all("SELECT * FROM jobs WHERE state='queued' AND not_before <= ?"
                         " ORDER BY lane='reprocess', priority DESC, id LIMIT ?", (now, limit))
        return [JobRecord(**dict(r)) for r in rows]

    def jobs_for(self, kind: str, subject_id: int, stage: str | None = None) -> list[JobRecord]:
        sql, args = "SELECT * FROM jobs WHERE kind=? AND subject_id=?", [kind, subject_id]
        if stage is not None:
            sql, args = sql + " AND stage=?", args + [stage]
        return [JobRecord(**dict(r)) for r in self._all(sql + " ORDER BY id", args)]

    def mark_running(self, job_id: int, worker_pid: int, est_bytes: int | None = None) -> None:
        with self.transaction():
            self._db.execute("UPDATE jobs SET state='running', tries=tries+1, started_at=?, worker_pid=?,"
                             " est_bytes=COALESCE(?, est_bytes) WHERE id=? AND state='queued'",
                             (time.time(), worker_pid, est_bytes, job_id))

    def finish_job(self, job_id: int, state: str, *, products: Sequence[NewProduct] = (),
                   context: str | None = None, references: Mapping[str, str] | None = None,
                   cal_ver: str | None = None, seconds: float | None = None,
                   error_class: str | None = None, error_message: str | None = None) -> list[int]:
        """Terminal state for a job and, with it, its products (new current versions). Returns the
        new product ids. Idempotent: a job already terminal is left alone (returns [])."""
        if state not in TERMINAL_JOB_STATES:
            raise ValueError(f"not a terminal job state: {state!r}")
        with self.transaction():
            job = self.job(job_id)
            if job.state in TERMINAL_JOB_STATES:
                return []
            self._db.execute("UPDATE jobs SET state=?, finished_at=?, seconds=?, error_class=?, error_message=?"
                             " WHERE id=?", (state, time.time(), seconds, error_class, error_message, job_id))
            return [self._add_product(job, p, context, references or {}, cal_ver) for p in products]

    def retry_job(self, job_id: int, *, delay: float, error_class: str, error_message: str) -> None:
        """Back to the queue, not before ``delay`` seconds from now."""
        with self.transaction():
            self._db.execute("UPDATE jobs SET state='queued', not_before=?, worker_pid=NULL, error_class=?,"
                             " error_message=? WHERE id=? AND state='running'",
                             (time.time() + delay, error_class, error_message, job_id))

    def requeue_job(self, job_id: int) -> None:
        """A running job goes back to the queue as it was (shutdown, lost worker), try not counted."""
        with self.transaction():
            self._db.execute("UPDATE jobs SET state='queued', tries=MAX(tries-1, 0), worker_pid=NULL"
                             " WHERE id=? AND state='running'", (job_id,))

    def recover(self) -> int:
        """After a crash: running jobs go back to the queue, running associations to ready.
        Returns the number of jobs re-queued."""
        with self.transaction():
            n = self._db.execute("UPDATE jobs SET state='queued', worker_pid=NULL WHERE state='running'").rowcount
            self._db.execute("UPDATE associations SET state='ready', updated_at=? WHERE state='running'",
                             (time.time(),))
        return int(n)

    def active_jobs_for_exposures(self, exposure_ids: Sequence[int]) -> int:
        if not exposure_ids:
            return 0
        marks = ",".join("?" * len(exposure_ids))
        row = self._one(f"SELECT COUNT(*) FROM jobs WHERE kind='exposure' AND subject_id IN ({marks})"
                        " AND state IN ('queued', 'running')", list(exposure_ids))
        return int(row[0])

    # -- products -------------------------------------------------------------------------------

    def _add_product(self, job: JobRecord, product: NewProduct, context: str | None,
                     references: Mapping[str, str], cal_ver: str | None) -> int:
        column = "exposure_id" if job.kind == "exposure" else "association_id"
        row = self._one(f"SELECT MAX(version) FROM products WHERE {column}=? AND kind=?",
                        (job.subject_id, product.kind))
        version = int(row[0] or 0) + 1
        self._db.execute(f"UPDATE products SET current=0 WHERE {column}=? AND kind=? AND current=1",
                         (job.subject_id, product.kind))
        cur = self._db.execute(
            f"INSERT INTO products (path, kind, stage, {column}, job_id, crds_context, reference_files, cal_ver,"
            " version, current, checksum, size, created_at) VALUES (?,?,?,?,?,?,?,?,?,1,?,?,?)",
            (product.path, product.kind, job.stage, job.subject_id, job.id, context,
             json.dumps(dict(references), sort_keys=True), cal_ver, version, product.checksum, product.size,
             time.time()))
        return int(cur.lastrowid)

    def current_products(self, *, exposure_id: int | None = None, association_id: int | None = None,
                         stage: str | None = None) -> list[ProductRecord]:
        sql, args = "SELECT * FROM products WHERE current=1", []
        if exposure_id is not None:
            sql, args = sql + " AND exposure_id=?", args + [exposure_id]
        if association_id is not None:
            sql, args = sql + " AND association_id=?", args + [association_id]
        if stage is not None:
            sql, args = sql + " AND stage=?", args + [stage]
        return [_product(r) for r in self._all(sql + " ORDER BY id", args)]

    def product_versions(self, path: str) -> list[ProductRecord]:
        """Every recorded version of the product at ``path`` (a moved old version keeps its row)."""
        row = self._one("SELECT exposure_id, association_id, kind FROM products WHERE path=? ORDER BY id DESC",
                        (path,))
        if row is None:
            return []
        column = "exposure_id" if row["exposure_id"] is not None else "association_id"
        rows = self._all(f"SELECT * FROM products WHERE {column}=? AND kind=? ORDER BY version",
                         (row[column], row["kind"]))
        return [_product(r) for r in rows]

    def set_product_path(self, product_id: int, path: str) -> None:
        """An old version was moved (e.g. to a history folder): record where it is now."""
        with self.transaction():
            self._db.execute("UPDATE products SET path=? WHERE id=?", (path, product_id))

    # -- associations ---------------------------------------------------------------------------

    def upsert_association(self, asn_id: str, *, input_id: int | None, path: str, asn_type: str | None,
                           asn_rule: str | None, product_name: str, members: Sequence[Member],
                           deadline: float | None, output_dir: str) -> int:
        """Record an association (a newer asn file with the same asn_id replaces the member list)."""
        now = time.time()
        with self.transaction():
            row = self._one("SELECT id FROM associations WHERE asn_id=?", (asn_id,))
            if row is None:
                cur = self._db.execute(
                    "INSERT INTO associations (asn_id, input_id, path, asn_type, asn_rule, product_name, state,"
                    " deadline, output_dir, created_at, updated_at) VALUES (?,?,?,?,?,?,'waiting',?,?,?,?)",
                    (asn_id, input_id, path, asn_type, asn_rule, product_name, deadline, output_dir, now, now))
                association_id = int(cur.lastrowid)
            else:
                association_id = int(row["id"])
                self._db.execute(
                    "UPDATE associations SET input_id=?, path=?, asn_type=?, asn_rule=?, product_name=?,"
                    " state=CASE WHEN state IN ('running') THEN state ELSE 'waiting' END, deadline=?,"
                    " output_dir=?, updated_at=? WHERE id=?",
                    (input_id, path, asn_type, asn_rule, product_name, deadline, output_dir, now, association_id))
                self._db.execute("DELETE FROM association_members WHERE association_id=?", (association_id,))
            self._db.executemany("INSERT INTO association_members VALUES (?,?,?,?)",
                                 [(association_id, m.expname, m.exptype, m.stem) for m in members])
            return association_id

    def association(self, association_id: int) -> AssociationRecord:
        row = self._one("SELECT * FROM associations WHERE id=?", (association_id,))
        if row is None:
            raise KeyError(f"no association {association_id}")
        return self._association(row)

    def association_by_asn_id(self, asn_id: str) -> AssociationRecord | None:
        row = self._one("SELECT * FROM associations WHERE asn_id=?", (asn_id,))
        return None if row is None else self._association(row)

    def associations_with_member(self, stem: str, exposure_name: str | None = None) -> list[AssociationRecord]:
        rows = self._all("SELECT DISTINCT a.* FROM associations a JOIN association_members m"
                         " ON m.association_id = a.id WHERE m.stem IN (?, ?) ORDER BY a.id",
                         (stem, exposure_name or stem))
        return [self._association(r) for r in rows]

    def associations_in_state(self, *states: str) -> list[AssociationRecord]:
        marks = ",".join("?" * len(states))
        rows = self._all(f"SELECT * FROM associations WHERE state IN ({marks}) ORDER BY id", states)
        return [self._association(r) for r in rows]

    def set_association_state(self, association_id: int, state: str, *, note: str | None = None,
                              forced: bool | None = None) -> None:
        with self.transaction():
            self._db.execute("UPDATE associations SET state=?, note=COALESCE(?, note),"
                             " forced=COALESCE(?, forced), updated_at=? WHERE id=?",
                             (state, note, None if forced is None else int(forced), time.time(), association_id))

    def _association(self, row: sqlite3.Row) -> AssociationRecord:
        members = tuple(Member(r["expname"], r["exptype"], r["stem"]) for r in self._all(
            "SELECT expname, exptype, stem FROM association_members WHERE association_id=? ORDER BY rowid",
            (row["id"],)))
        data = dict(row)
        data["forced"] = bool(data["forced"])
        return AssociationRecord(**data, members=members)

    # -- errors ---------------------------------------------------------------------------------

    def add_error(self, error_class: str, message: str, *, stage: str | None = None, path: str | None = None,
                  outcome: str | None = None, traceback: str | None = None, input_id: int | None = None,
                  exposure_id: int | None = None, association_id: int | None = None,
                  job_id: int | None = None) -> int:
        with self.transaction():
            cur = self._db.execute(
                "INSERT INTO errors (at, input_id, exposure_id, association_id, job_id, stage, path, error_class,"
                " message, traceback, outcome) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (time.time(), input_id, exposure_id, association_id, job_id, stage, path, error_class, message,
                 traceback, outcome))
            return int(cur.lastrowid)

    def recent_errors(self, limit: int = 10) -> list[ErrorRecord]:
        rows = self._all("SELECT id, at, stage, path, error_class, message, outcome, job_id FROM errors"
                         " ORDER BY id DESC LIMIT ?", (limit,))
        return [ErrorRecord(**dict(r)) for r in rows]

    # -- CRDS contexts --------------------------------------------------------------------------

    def record_context(self, context: str, origin: str, *, active: bool = True) -> bool:
        """Note a context seen (from a worker, the cache, Kafka, the operator); ``active`` makes it
        the one new jobs use. Returns True when the active context changed."""
        now = time.time()
        with self.transaction():
            before = self.active_context()
            self._db.execute("INSERT INTO crds_contexts (context, origin, first_seen, seen_at) VALUES (?,?,?,?)"
                             " ON CONFLICT(context) DO UPDATE SET seen_at=excluded.seen_at, origin=excluded.origin",
                             (context, origin, now, now))
            if active:
                self._db.execute("UPDATE crds_contexts SET active=(context=?)", (context,))
            return active and before != context

    def active_context(self) -> str | None:
        row = self._one("SELECT context FROM crds_contexts WHERE active=1")
        return None if row is None else str(row[0])

    def contexts(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._all("SELECT * FROM crds_contexts ORDER BY first_seen")]

    # -- for the CRDS re-queue logic ------------------------------------------------------------

    def exposures_for_reprocessing(self) -> list[ExposureRecord]:
        """Every live exposure with its CRDS selection parameters, the reference types of its
        pipelines, and per stage the context and references its current products used."""
        uses: dict[int, dict[str, StageUse]] = {}
        for row in self._all("SELECT id, exposure_id, stage, crds_context, reference_files FROM products"
                             " WHERE current=1 AND exposure_id IS NOT NULL ORDER BY id"):
            stages = uses.setdefault(row["exposure_id"], {})
            prior = stages.get(row["stage"])
            ids = (prior.product_ids if prior else ()) + (row["id"],)
            stages[row["stage"]] = StageUse(row["crds_context"], json.loads(row["reference_files"] or "{}"), ids)
        members: dict[str, list[int]] = {}
        for row in self._all("SELECT association_id, stem FROM association_members"):
            members.setdefault(row["stem"], []).append(int(row["association_id"]))
        out = []
        seen: set[str] = set()
        for row in self._all("SELECT e.id, e.stem, e.exposure_name, e.path, e.crds_parameters, e.reftypes"
                             " FROM exposures e JOIN inputs i ON i.id = e.input_id"
                             " WHERE i.state NOT IN ('quarantined', 'duplicate', 'remote') ORDER BY e.id DESC"):
            if row["stem"] in seen:
                continue          # a file delivered again under the same name: its newest exposure only
            seen.add(row["stem"])
            asns = tuple(sorted(set(members.get(row["stem"], []) + members.get(row["exposure_name"], []))))
            out.append(ExposureRecord(int(row["id"]), row["stem"], row["path"], json.loads(row["crds_parameters"]),
                                      json.loads(row["reftypes"]), uses.get(row["id"], {}), asns))
        return out[::-1]

    def get_meta(self, key: str) -> str | None:
        """A value of the ledger's key/value ``meta`` table (e.g. the re-processing campaign)."""
        row = self._one("SELECT value FROM meta WHERE key=?", (key,))
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction():
            self._db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                             (key, value))

    def last_job_id(self) -> int:
        row = self._one("SELECT MAX(id) FROM jobs")
        return int(row[0] or 0)

    def busy_exposures(self) -> set[int]:
        """Ids of the exposures with a queued or running job."""
        return {int(r[0]) for r in self._all("SELECT DISTINCT subject_id FROM jobs WHERE kind='exposure'"
                                              " AND state IN ('queued', 'running')")}

    def lane_job_counts(self, lane: str, after_job_id: int = 0) -> dict[tuple[str, str], int]:
        """(stage, state) -> jobs of ``lane`` with an id above ``after_job_id``."""
        return {(r[0], r[1]): int(r[2]) for r in self._all(
            "SELECT stage, state, COUNT(*) FROM jobs WHERE lane=? AND id>? GROUP BY stage, state",
            (lane, after_job_id))}

    # -- operator requests (the only rows other processes write) --------------------------------

    def add_request(self, command: str, argument: str | None = None) -> int:
        with self.transaction():
            cur = self._db.execute("INSERT INTO requests (command, argument, requested_at) VALUES (?,?,?)",
                                   (command, argument, time.time()))
            return int(cur.lastrowid)

    def pending_requests(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._all("SELECT * FROM requests WHERE handled_at IS NULL ORDER BY id")]

    def finish_request(self, request_id: int, result: str) -> None:
        with self.transaction():
            self._db.execute("UPDATE requests SET handled_at=?, result=? WHERE id=?", (time.time(), result, request_id))

    def request(self, request_id: int) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM requests WHERE id=?", (request_id,))
        return None if row is None else dict(row)

    # -- counts (status, metrics) ---------------------------------------------------------------

    def job_counts(self) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in self._all("SELECT state, COUNT(*) FROM jobs GROUP BY state")}

    def queue_by_lane(self) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in self._all("SELECT lane, COUNT(*) FROM jobs WHERE state='queued'"
                                                    " GROUP BY lane")}

    def stage_counts(self) -> dict[tuple[str, str], int]:
        """(stage, state) -> number of jobs."""
        return {(r[0], r[1]): int(r[2]) for r in self._all("SELECT stage, state, COUNT(*) FROM jobs"
                                                           " GROUP BY stage, state")}

    def association_counts(self) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in self._all("SELECT state, COUNT(*) FROM associations GROUP BY state")}

    def input_counts(self) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in self._all("SELECT state, COUNT(*) FROM inputs GROUP BY state")}


# ---------------------------------------------------------------------------------------------
# Row conversion
# ---------------------------------------------------------------------------------------------

def _input(row: sqlite3.Row | None) -> InputRecord | None:
    return None if row is None else InputRecord(**dict(row))


def _exposure(row: sqlite3.Row) -> ExposureRow:
    data = dict(row)
    data["shape"] = tuple(json.loads(data["shape"] or "[]"))
    data["crds_parameters"] = json.loads(data["crds_parameters"] or "{}")
    data["pipelines"] = json.loads(data["pipelines"] or "{}")
    data["reftypes"] = json.loads(data["reftypes"] or "{}")
    return ExposureRow(**data)


def _product(row: sqlite3.Row) -> ProductRecord:
    data = dict(row)
    data["references"] = json.loads(data.pop("reference_files") or "{}")
    data["current"] = bool(data["current"])
    return ProductRecord(**data)


__all__ = ["AssociationRecord", "ErrorRecord", "ExposureInfo", "ExposureRecord", "ExposureRow", "InputRecord",
           "JobRecord", "JobSpec", "Ledger", "Member", "NewProduct", "ProductRecord", "STAGES", "StageUse"]
