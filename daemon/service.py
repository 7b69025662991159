"""The daemon: sources -> ledger -> scheduler -> workers -> products -> sinks.

One main thread owns the ledger and every decision; sources, worker reader threads and signal
handlers only put events on its queue. The order of effects makes ``kill -9`` at any moment safe:

* a product is renamed into place by the worker *before* the ledger records it (and marks the
  job done, and queues what follows, in the same transaction) — a job interrupted before that
  runs again after a restart and replaces its partial work; temporary files of killed jobs
  (``.<name>.*.part``) are removed at start-up;
* an input is accepted (ledger row + its detector1 job in one transaction) only after its checksum
  and headers were read; an input not yet accepted is found again by the start-up rescan;
* sources are acknowledged (``Arrival.ack``) only after the terminal state is committed.

SIGTERM/SIGINT stop the intake, let running jobs finish within ``grace_seconds`` (then kill them and
put them back in the queue) and exit 0.

Seams for other components: :meth:`Daemon.add_source`, :meth:`Daemon.add_sink`,
:meth:`Daemon.add_context_listener` (called by :meth:`Daemon.on_context_change`),
:meth:`Daemon.add_pre_dispatch`, :meth:`Daemon.has_capacity`, :meth:`Daemon.call_soon`,
:meth:`Daemon.recycle_workers`, and ``COMPONENTS`` (config section -> ``"module:function"`` called
with the daemon before it starts).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fcntl
import importlib
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import structlog

from calstream.steps.errors import InputError

from .config import ConfigError, DaemonConfig, config_from_args
from .intake import file_checksum, preload, read_association_info, read_exposure_info, same_checksum
from .ledger import JobRecord, Ledger, NewProduct
from .metrics import Metrics
from .quarantine import quarantine_file
from .scheduler import Scheduler
from .sinks import LogSink, Sink, error_event, product_event
from .sources import Arrival, FolderSource, Source
from .workers import WorkerPool

log = structlog.get_logger("calstream.daemon")

#: config section -> "module:function"; the function is called with the Daemon before it starts
#: when the section is present in the config file (Kafka, CRDS watching, ... register here).
COMPONENTS: dict[str, str] = {"kafka": "calstream.daemon.kafka_wiring:attach_kafka"}

TICK_SECONDS = 0.25
SLOW_TICK_SECONDS = 1.0
RETRY_DELAY_MAX = 60.0
WORKERS_FAILING = "worker processes fail to start"
INTAKE_RETRY_SECONDS = 10.0

ContextListener = Callable[[str, str, "Daemon"], None]
PreDispatch = Callable[[JobRecord, dict], None]


class DaemonError(RuntimeError):
    """The daemon cannot start (lock held, unusable folder, ...)."""


class Daemon:
    """The calstream service. Build it, attach sources/sinks/listeners, then :meth:`run`."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.ledger: Ledger | None = None
        self.scheduler: Scheduler | None = None
        self.pool: WorkerPool | None = None
        self._sources: list[Source] = []
        self._sinks: list[Sink] = [LogSink()]
        self._context_listeners: list[ContextListener] = []
        self._pre_dispatch: list[PreDispatch] = []
        #: optional stage-3 gate handed to the scheduler (Kafka scale-out: association ownership)
        self.stage3_gate: Callable[[Any], bool] | None = None
        self._request_handlers: dict[str, Callable[[str | None], str]] = {
            "force": lambda asn_id: self.force(str(asn_id)), "context": self._context_request}
        # SimpleQueue: put() is safe from a signal handler interrupting a get() on the same thread
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._acks: dict[int, list[Callable[[str], None]]] = {}
        self._reserved: dict[int, int] = {}
        self._pending_arrivals = 0
        #: content hashing off the main thread (a full-frame uncal takes ~1.5 s to hash)
        self._hasher = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="calstream-hash")
        self._hashing = 0
        self._deferred: list[tuple[float, Arrival]] = []
        self._pending_lock = threading.Lock()
        self._stop_reason: str | None = None
        self._grace_deadline: float | None = None
        self._main_thread: threading.Thread | None = None
        self._lock_fd: int | None = None
        self.metrics_port: int | None = None

    # -- seams --------------------------------------------------------------------------------------

    def add_source(self, source: Source) -> None:
        """Add an input source (before :meth:`run`)."""
        self._sources.append(source)

    def add_sink(self, sink: Sink) -> None:
        """Add an event sink; events are published from the main thread."""
        self._sinks.append(sink)

    def add_context_listener(self, listener: ContextListener) -> None:
        """``listener(context, origin, daemon)`` runs on the main thread after a context change
        was recorded (the reprocessing policy lives there)."""
        self._context_listeners.append(listener)

    def add_pre_dispatch(self, hook: PreDispatch) -> None:
        """``hook(job, task)`` runs on the main thread just before a job goes to a worker; it may
        edit the task dict (e.g. the context) or move the previous products to a history folder."""
        self._pre_dispatch.append(hook)

    def add_request_handler(self, command: str, handler: Callable[[str | None], str]) -> None:
        """Answer operator requests ``command`` (rows another process put in the ledger's requests
        table) with ``handler(argument) -> result`` on the main thread; a result starting with
        "error" means failure. Built in: "force" (asn id) and "context" (a .pmap name)."""
        self._request_handlers[command] = handler

    def submit(self, arrival: Arrival) -> None:
        """Hand an arrival to the daemon (any thread; never blocks)."""
        with self._pending_lock:
            self._pending_arrivals += 1
        self._events.put(("arrival", arrival))

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the main thread (where the ledger may be written)."""
        self._events.put(("call", fn))

    def on_context_change(self, context: str, origin: str) -> None:
        """A CRDS context was announced (cache sync, Kafka, operator): record it as the active one
        and tell the listeners. Any thread."""
        if threading.current_thread() is not self._main_thread:
            self.call_soon(lambda: self.on_context_change(context, origin))
            return
        assert self.ledger is not None
        changed = self.ledger.record_context(context, origin, active=True)
        log.info("CRDS context", context=context, origin=origin, changed=changed)
        for listener in self._context_listeners:
            try:
                listener(context, origin, self)
            except Exception:
                log.exception("context listener failed", context=context, listener=repr(listener))

    def has_capacity(self) -> bool:
        """False while the backlog or the memory budget is full (any thread)."""
        return self.scheduler is not None and self.scheduler.has_capacity() and self._stop_reason is None

    def recycle_workers(self) -> None:
        """Replace every worker after its current job (new processes: fresh CRDS caches)."""
        self.call_soon(lambda: self.pool.recycle_all() if self.pool else None)

    def request_stop(self, reason: str = "requested") -> None:
        """Stop intake, finish running jobs within the grace period, then return from run()."""
        self._events.put(("stop", reason))

    # -- running ------------------------------------------------------------------------------------

    def run(self) -> int:
        """Start everything, serve until stopped; returns the exit code (0)."""
        self._main_thread = threading.current_thread()
        self._acquire_lock()
        try:
            self._start()
            self._loop()
            self._drain()
        finally:
            self._close()
        return 0

    def _acquire_lock(self) -> None:
        lock_path = Path(f"{self.config.ledger}.lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise DaemonError(f"another calstream daemon uses the ledger {self.config.ledger}") from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _start(self) -> None:
        cfg = self.config
        env = {}
        if cfg.crds_path is not None:
            env["CRDS_PATH"] = str(cfg.crds_path)
            os.environ["CRDS_PATH"] = str(cfg.crds_path)
        for folder in (cfg.output_dir, cfg.quarantine):
            folder.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(cfg.ledger)
        requeued = self.ledger.recover()
        removed = remove_partial_files(cfg.output_dir)
        log.info("ledger open", ledger=str(cfg.ledger), requeued_jobs=requeued, partial_files_removed=removed)
        self.scheduler = Scheduler(self.ledger, workers=cfg.workers, memory_budget=cfg.memory_budget,
                                   stuck_after=cfg.stuck_after)
        self.scheduler.stage3_gate = self.stage3_gate
        if cfg.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.serve(cfg.metrics_host, cfg.metrics_port)
            except OSError as exc:
                raise DaemonError(f"metrics endpoint {cfg.metrics_host}:{cfg.metrics_port}: {exc.strerror or exc}") from exc
        self.pool = WorkerPool(cfg.workers, lambda m: self._events.put(("worker", m)),
                               recycle_after=cfg.recycle_after, env=env, log_level=cfg.log_level,
                               log_json=cfg.log_json)
        self.pool.start()
        preload()
        if cfg.crds_context and self.ledger.active_context() != cfg.crds_context:
            self.on_context_change(cfg.crds_context, "config")
        with self.ledger.transaction():
            for asn in self.ledger.associations_in_state("waiting", "stuck"):
                self.scheduler.refresh(asn)
        folders = {getattr(s, "inbox", None) for s in self._sources}
        for inbox in cfg.inboxes:
            if inbox not in folders:
                self._sources.append(FolderSource(inbox, settle_seconds=cfg.settle_seconds,
                                                  rescan_seconds=cfg.rescan_seconds, polling=cfg.polling))
        for source in self._sources:
            source.start(self.submit)
        self._install_signals()
        self.metrics.set_phase("running")
        log.info("daemon running", pid=os.getpid(), workers=cfg.workers, inboxes=[str(p) for p in cfg.inboxes],
                 output_dir=str(cfg.output_dir), memory_budget=cfg.memory_budget, metrics_port=self.metrics_port)

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, frame: Any) -> None:
            name = signal.Signals(signum).name
            if self._stop_reason is not None and signum == signal.SIGINT:
                self._grace_deadline = 0.0        # second Ctrl-C: do not wait for running jobs
            self.request_stop(name)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _loop(self) -> None:
        next_tick = next_slow = 0.0
        while self._stop_reason is None:
            now = time.monotonic()
            try:
                event = self._events.get(timeout=max(0.0, min(next_tick - now, TICK_SECONDS)))
            except queue.Empty:
                event = None
            if event is not None:
                self._handle(event)
                for _ in range(256):
                    try:
                        self._handle(self._events.get_nowait())
                    except queue.Empty:
                        break
            now = time.monotonic()
            try:
                if now >= next_tick:
                    next_tick = now + TICK_SECONDS
                    self._tick(slow=now >= next_slow)
                    if now >= next_slow:
                        next_slow = now + SLOW_TICK_SECONDS
                self._dispatch()
            except Exception:         # e.g. the ledger locked by another process for too long
                log.exception("main loop step failed; going on")
                time.sleep(TICK_SECONDS)

    def _handle(self, event: tuple[str, Any]) -> None:
        kind, payload = event
        try:
            if kind == "arrival":
                with self._pending_lock:
                    self._pending_arrivals -= 1
                if self._stop_reason is None:
                    self._on_arrival(payload)
            elif kind == "hashed":
                self._hashing -= 1
                if self._stop_reason is None:
                    self._on_hashed(*payload)
            elif kind == "worker":
                self._on_worker_message(payload)
            elif kind == "call":
                payload()
            elif kind == "stop" and self._stop_reason is None:
                self._stop_reason = payload
        except Exception:
            log.exception("event handling failed", event=kind)

    def _tick(self, slow: bool) -> None:
        assert self.pool is not None and self.scheduler is not None and self.ledger is not None
        self.pool.kill_overdue(self.config.job_timeout)
        if not slow:
            return
        self.pool.maintain()
        if self.pool.start_failures:
            self.metrics.set_degraded(WORKERS_FAILING)
        else:
            self.metrics.clear_degraded(WORKERS_FAILING)
        self._handle_requests()
        with self.ledger.transaction():
            self.scheduler.check_stuck()
        queued = self.ledger.queue_by_lane()
        with self._pending_lock:
            backlog = queued.get("live", 0) + self._pending_arrivals + self._hashing
        self.scheduler.update_load(backlog, sum(self._reserved.values()))
        self.metrics.set_counts(self.ledger.job_counts(), queued, self.ledger.association_counts())
        self.metrics.workers_busy.set(len(self.pool.busy()))
        self.metrics.workers.set(self.pool.ready_count())
        self.metrics.memory_reserved.set(sum(self._reserved.values()))
        now = time.monotonic()
        due = [a for t, a in self._deferred if t <= now]
        self._deferred = [(t, a) for t, a in self._deferred if t > now]
        for arrival in due:
            self.submit(arrival)

    # -- intake ---------------------------------------------------------------------------------------

    def _on_arrival(self, arrival: Arrival) -> None:
        path = Path(arrival.path).absolute()
        self._guarded(arrival, path, self._intake, arrival, path)

    def _on_hashed(self, arrival: Arrival, path: Path, st: os.stat_result, checksum: str | BaseException) -> None:
        if isinstance(checksum, BaseException):
            self._guarded(arrival, path, _reraise, checksum)
        else:
            self._guarded(arrival, path, self._record_arrival, arrival, path, st, checksum)

    def _guarded(self, arrival: Arrival, path: Path, step: Callable[..., None], *args: Any) -> None:
        """Run an intake step; a vanished file is lost, an unreadable one tried again later."""
        try:
            step(*args)
        except FileNotFoundError:
            self._lost_arrival(arrival, path)
        except OSError as exc:            # unreadable for now (permissions, I/O error): try again later
            log.error("input unreadable; will try again", path=str(path), error=str(exc), retry_in=INTAKE_RETRY_SECONDS)
            self._deferred.append((time.monotonic() + INTAKE_RETRY_SECONDS, arrival))

    def _intake(self, arrival: Arrival, path: Path) -> None:
        """A file seen before is answered from the ledger; a new one is hashed on the hashing
        thread and recorded when its checksum comes back (:meth:`_record_arrival`)."""
        assert self.ledger is not None
        st = path.stat()
        known = self.ledger.find_input(str(path), st.st_size, st.st_mtime_ns)
        if known is not None:
            self._attach_ack(known.id, known.state, arrival.ack)
            return
        self._hashing += 1
        self._hasher.submit(self._hash, arrival, path, st)

    def _hash(self, arrival: Arrival, path: Path, st: os.stat_result) -> None:
        """(hashing thread) the file's checksum, or the error reading it, back to the main thread."""
        try:
            result: str | BaseException = file_checksum(path)
        except OSError as exc:
            result = exc
        self._events.put(("hashed", (arrival, path, st, result)))

    def _record_arrival(self, arrival: Arrival, path: Path, st: os.stat_result, checksum: str) -> None:
        assert self.ledger is not None and self.scheduler is not None
        known = self.ledger.find_input(str(path), st.st_size, st.st_mtime_ns)
        if known is not None:             # the same file announced twice while it was being hashed
            self._attach_ack(known.id, known.state, arrival.ack)
            return
        started = time.perf_counter()
        base = dict(origin=arrival.origin, checksum=checksum, size=st.st_size, mtime_ns=st.st_mtime_ns)
        if arrival.checksum and not same_checksum(arrival.checksum, checksum):
            self._quarantine_arrival(arrival, path, base, "ChecksumMismatch",
                                     f"{path}: checksum {checksum} differs from the announced {arrival.checksum}")
            return
        original = self.ledger.find_input_by_checksum(checksum)
        if original is not None:
            self.ledger.add_input(str(path), arrival.kind, state="duplicate", duplicate_of=original.id, **base)
            self.metrics.inputs.labels(arrival.kind, "duplicate").inc()
            log.warning("duplicate input: same content already received", path=str(path),
                        original=original.path, original_state=original.state)
            self._ack(arrival.ack, "duplicate")
            return
        try:
            if arrival.kind == "asn":
                input_id = self._accept_association(path, arrival, base)
            else:
                input_id = self._accept_exposure(path, arrival, base)
        except InputError as exc:
            self._quarantine_arrival(arrival, path, base, type(exc).__name__, str(exc))
            return
        self.metrics.inputs.labels(arrival.kind, "accepted").inc()
        log.info("input accepted", path=path.name, kind=arrival.kind, input=input_id,
                 intake_ms=round(1000 * (time.perf_counter() - started), 1))
        self._attach_ack(input_id, "accepted", arrival.ack)

    def _accept_exposure(self, path: Path, arrival: Arrival, base: dict[str, Any]) -> int:
        assert self.ledger is not None and self.scheduler is not None
        info = read_exposure_info(path, self.config.output_dir)
        with self.ledger.transaction():
            input_id = self.ledger.add_input(str(path), "uncal", **base)
            exposure_id = self.ledger.add_exposure(input_id, info)
            self.scheduler.exposure_arrived(exposure_id)
        return input_id

    def _accept_association(self, path: Path, arrival: Arrival, base: dict[str, Any]) -> int:
        assert self.ledger is not None and self.scheduler is not None
        info = read_association_info(path, self.config.output_dir)
        with self.ledger.transaction():
            input_id = self.ledger.add_input(str(path), "asn", **base)
            association_id = self.ledger.upsert_association(
                info.asn_id, input_id=input_id, path=str(path), asn_type=info.asn_type, asn_rule=info.asn_rule,
                product_name=info.product_name, members=info.members,
                deadline=time.time() + self.config.stuck_after, output_dir=info.output_dir)
            self.scheduler.refresh(self.ledger.association(association_id))
        return input_id

    def _quarantine_arrival(self, arrival: Arrival, path: Path, base: dict[str, Any], error_class: str,
                            message: str) -> None:
        assert self.ledger is not None
        target = quarantine_file(path, self.config.quarantine, stage="intake", error_class=error_class,
                                 message=message)
        with self.ledger.transaction():
            input_id = self.ledger.add_input(str(path), arrival.kind, state="quarantined", **base)
            self.ledger.set_input_state(input_id, "quarantined", quarantine_path=str(target))
            self.ledger.add_error(error_class, message, stage="intake", path=str(path), outcome="quarantined",
                                  input_id=input_id)
        self._report_error(path, message, error_class, "intake", quarantined=target)
        self.metrics.inputs.labels(arrival.kind, "quarantined").inc()
        self._ack(arrival.ack, "quarantined")

    def _lost_arrival(self, arrival: Arrival, path: Path) -> None:
        if arrival.ack is None:
            log.debug("arrival vanished before it was read", path=str(path))
            return
        message = f"{path}: file does not exist"
        self._report_error(path, message, "MissingInput", "intake")
        self._ack(arrival.ack, "failed")

    # -- acknowledgements -----------------------------------------------------------------------------

    def _attach_ack(self, input_id: int, state: str, ack: Callable[[str], None] | None) -> None:
        if ack is None:
            return
        if state in ("done", "failed", "quarantined", "duplicate"):
            self._ack(ack, state)
        else:
            self._acks.setdefault(input_id, []).append(ack)

    def _ack(self, ack: Callable[[str], None] | None, outcome: str) -> None:
        if ack is None:
            return
        try:
            ack(outcome)
        except Exception:
            log.exception("source acknowledgement failed", outcome=outcome)

    def _settle_input(self, job: JobRecord) -> tuple[int, str] | None:
        """Inside a transaction: if the job's input reached a terminal state, record it."""
        assert self.ledger is not None
        if job.kind == "exposure":
            exposure = self.ledger.exposure(job.subject_id)
            input_id = exposure.input_id
            jobs = self.ledger.jobs_for("exposure", exposure.id)
            if any(j.state in ("queued", "running") for j in jobs):
                return None
            latest = {j.stage: j.state for j in jobs}
            states = set(latest.values())
            outcome = "quarantined" if "quarantined" in states else "failed" if "failed" in states else "done"
        else:
            asn = self.ledger.association(job.subject_id)
            if asn.input_id is None or asn.state not in ("done", "failed", "skipped"):
                return None
            input_id, outcome = asn.input_id, ("failed" if asn.state == "failed" else "done")
            if job.state == "quarantined":
                outcome = "quarantined"
        current = self.ledger.input(input_id)
        if current.state not in ("quarantined", "duplicate") and current.state != outcome:
            self.ledger.set_input_state(input_id, outcome)
        return input_id, outcome

    def _fire_acks(self, settled: tuple[int, str] | None) -> None:
        if settled is None:
            return
        input_id, outcome = settled
        for ack in self._acks.pop(input_id, []):
            self._ack(ack, outcome)

    # -- dispatch -------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        if self._stop_reason is not None:
            return
        assert self.pool is not None and self.scheduler is not None and self.ledger is not None
        idle = self.pool.idle()
        if not idle:
            return
        picks = self.scheduler.next_jobs(len(idle), sum(self._reserved.values()), running=len(self.pool.busy()))
        for (job, need), worker in zip(picks, idle):
            try:
                task = self._task(job)
                for hook in self._pre_dispatch:
                    hook(job, task)
            except Exception as exc:
                log.exception("cannot build the task", job=job.id)
                with self.ledger.transaction():
                    self.ledger.mark_running(job.id, 0)
                self._job_failed(self.ledger.job(job.id), {"class": type(exc).__name__, "message": str(exc),
                                                           "category": "not_implemented", "traceback": None})
                continue
            with self.ledger.transaction():
                self.ledger.mark_running(job.id, int(worker.pid or 0), need)
                if job.kind == "association":
                    self.ledger.set_association_state(job.subject_id, "running")
            self.pool.assign(worker, job.id, task)
            self._reserved[job.id] = need
            log.info("job started", job=job.id, step=job.stage, lane=job.lane, try_=job.tries + 1,
                     worker=worker.serial, exposure=task.get("exposure"),
                     association=(task.get("association") or {}).get("asn_id"), context=task.get("context"))

    def _task(self, job: JobRecord) -> dict[str, Any]:
        """The small dict a worker needs to run ``job``."""
        assert self.ledger is not None and self.scheduler is not None
        context = job.context or self.config.crds_context or self.ledger.active_context()
        task: dict[str, Any] = {"job_id": job.id, "stage": job.stage, "context": context, "fsync": True}
        if job.kind == "exposure":
            exposure = self.ledger.exposure(job.subject_id)
            task.update(exposure=exposure.stem, output_dir=exposure.output_dir, input=exposure.path)
            if job.stage == "image2":
                rates = [p for p in self.ledger.current_products(exposure_id=exposure.id, stage="detector1")
                         if p.kind == "rate"]
                if not rates:
                    raise FileNotFoundError(f"{exposure.stem}: no rate product recorded for image2")
                task["input"] = rates[-1].path
            return task
        asn = self.ledger.association(job.subject_id)
        ready = self.scheduler.readiness(asn)
        task.update(output_dir=asn.output_dir, members=[p.path for p in ready.cal_products],
                    association={"asn_id": asn.asn_id, "product_name": asn.product_name,
                                 "asn_type": asn.asn_type, "asn_rule": asn.asn_rule})
        if not task["members"]:
            raise FileNotFoundError(f"association {asn.asn_id}: no member has a cal product")
        return task

    # -- results --------------------------------------------------------------------------------------

    def _on_worker_message(self, message: dict[str, Any]) -> None:
        assert self.pool is not None and self.ledger is not None
        kind = message.get("type")
        if kind == "ready":
            self.pool.on_ready(message["worker"])
            log.debug("worker ready", worker=message["worker"], pid=message["pid"],
                      seconds=round(message["seconds"], 2))
        elif kind == "result":
            self.pool.on_result(message["worker"])
            self._reserved.pop(message["job_id"], None)
            job = self.ledger.job(message["job_id"])
            if job.state != "running":
                log.warning("result for a job that is not running", job=job.id, state=job.state)
            elif message.get("ok"):
                self._job_succeeded(job, message)
            else:
                self._job_failed(job, message["error"])
        elif kind == "exit":
            job_id, reason = self.pool.on_exit(message["worker"], message.get("exitcode"))
            if job_id is None:
                return
            self._reserved.pop(job_id, None)
            job = self.ledger.job(job_id)
            if job.state != "running":
                return
            if self._stop_reason is not None and reason.startswith("shutdown"):
                self.ledger.requeue_job(job_id)
                return
            error_class = "JobTimeout" if reason.startswith("JobTimeout") else "WorkerDied"
            self._job_failed(job, {"class": error_class, "message": reason, "category": "transient",
                                   "traceback": None})

    def _job_succeeded(self, job: JobRecord, result: dict[str, Any]) -> None:
        assert self.ledger is not None and self.scheduler is not None
        products = [NewProduct(p["path"], kind, p.get("checksum"), p.get("size"))
                    for kind, p in result["products"].items()]
        context = result.get("context")
        with self.ledger.transaction():
            self.ledger.finish_job(job.id, "done", products=products, context=context,
                                   references=result.get("references"), cal_ver=result.get("cal_ver"),
                                   seconds=result.get("seconds"))
            if context:
                self.ledger.record_context(context, "worker", active=self.ledger.active_context() is None)
            done = self.ledger.job(job.id)
            self.scheduler.after_job(done)
            settled = self._settle_input(done)
        self.metrics.observe_job(job.stage, float(result.get("seconds") or 0.0), result.get("step_seconds") or {})
        self.metrics.products.labels(job.stage).inc(len(products))
        if job.stage == "detector1":
            self.metrics.bytes_processed.inc(self.ledger.exposure(job.subject_id).nbytes or 0)
        subject = self._subject_names(job)
        log.info("job done", job=job.id, step=job.stage, seconds=round(float(result.get("seconds") or 0), 3),
                 products=[Path(p.path).name for p in products], context=context, **subject)
        for product in products:
            self._publish(product_event(path=product.path, product_type=product.kind.split(":")[0], stage=job.stage,
                                        crds_context=context, cal_ver=result.get("cal_ver"),
                                        checksum=product.checksum, **subject))
        self._fire_acks(settled)

    def _job_failed(self, job: JobRecord, error: dict[str, Any]) -> None:
        assert self.ledger is not None
        category, error_class, message = error["category"], error["class"], error["message"]
        self.metrics.errors.labels(error_class).inc()
        limit = self.config.reference_tries if category == "reference" else self.config.max_tries
        subject = self._subject_names(job)
        if category in ("transient", "reference") and job.tries < limit:
            delay = min(RETRY_DELAY_MAX, 2.0 ** job.tries)
            with self.ledger.transaction():
                self.ledger.retry_job(job.id, delay=delay, error_class=error_class, error_message=message)
                self.ledger.add_error(error_class, message, stage=job.stage, outcome="retry", job_id=job.id,
                                      path=self._subject_path(job),
                                      traceback=error.get("traceback"), **self._subject_ids(job))
            log.warning("job failed; will retry", job=job.id, step=job.stage, try_=job.tries, of=limit,
                        retry_in=delay, error_class=error_class, error=message, **subject)
            return
        if category == "input":
            self._quarantine_job(job, error)
            return
        with self.ledger.transaction():
            self.ledger.finish_job(job.id, "failed", error_class=error_class, error_message=message)
            self.ledger.add_error(error_class, message, stage=job.stage, outcome="failed", job_id=job.id,
                                  path=self._subject_path(job),
                                  traceback=error.get("traceback"), **self._subject_ids(job))
            if job.kind == "association":
                self.ledger.set_association_state(job.subject_id, "failed", note=f"{error_class}: {message}")
            settled = self._settle_input(self.ledger.job(job.id))
        log.error("job failed for good", job=job.id, step=job.stage, tries=job.tries, error_class=error_class,
                  error=message, **subject)
        self._report_error(Path(self._subject_path(job)), message, error_class, job.stage)
        self._fire_acks(settled)

    def _quarantine_job(self, job: JobRecord, error: dict[str, Any]) -> None:
        assert self.ledger is not None
        path = Path(self._subject_path(job))
        target = quarantine_file(path, self.config.quarantine, stage=job.stage, error_class=error["class"],
                                 message=error["message"], traceback=error.get("traceback"))
        with self.ledger.transaction():
            self.ledger.finish_job(job.id, "quarantined", error_class=error["class"], error_message=error["message"])
            self.ledger.add_error(error["class"], error["message"], stage=job.stage, path=str(path),
                                  outcome="quarantined", job_id=job.id, traceback=error.get("traceback"),
                                  **self._subject_ids(job))
            if job.kind == "association":
                self.ledger.set_association_state(job.subject_id, "failed", note=f"quarantined: {error['message']}")
            settled = self._settle_input(self.ledger.job(job.id))
            if settled is not None:
                self.ledger.set_input_state(settled[0], "quarantined", quarantine_path=str(target))
        log.error("input quarantined", job=job.id, step=job.stage, path=str(path), error_class=error["class"],
                  error=error["message"], **self._subject_names(job))
        self._report_error(path, error["message"], error["class"], job.stage, quarantined=target)
        self._fire_acks(settled)

    def _subject_path(self, job: JobRecord) -> str:
        assert self.ledger is not None
        if job.kind == "exposure":
            return self.ledger.exposure(job.subject_id).path
        return self.ledger.association(job.subject_id).path

    def _subject_ids(self, job: JobRecord) -> dict[str, int]:
        return {"exposure_id" if job.kind == "exposure" else "association_id": job.subject_id}

    def _subject_names(self, job: JobRecord) -> dict[str, str | None]:
        assert self.ledger is not None
        if job.kind == "exposure":
            return {"exposure": self.ledger.exposure(job.subject_id).stem, "association": None}
        return {"exposure": None, "association": self.ledger.association(job.subject_id).asn_id}

    def _report_error(self, path: Path, reason: str, error_class: str, stage: str,
                      quarantined: Path | None = None) -> None:
        self._publish(error_event(path=str(quarantined or path), reason=reason, error_class=error_class, stage=stage))

    def _publish(self, event: dict[str, Any]) -> None:
        for sink in self._sinks:
            try:
                sink.publish(event)
            except Exception:
                log.exception("sink failed", sink=type(sink).__name__, event_type=event.get("type"))

    # -- operator requests ----------------------------------------------------------------------------

    def force(self, asn_id: str) -> str:
        """Run stage 3 of ``asn_id`` now with the members it has (main thread)."""
        assert self.ledger is not None and self.scheduler is not None
        with self.ledger.transaction():
            return self.scheduler.force(asn_id)

    def _context_request(self, context: str | None) -> str:
        if not context or not str(context).endswith(".pmap"):
            raise ValueError(f"not a CRDS context name: {context!r} (expected e.g. jwst_0002.pmap)")
        self.on_context_change(str(context), "operator")
        return f"context {context} recorded as active"

    def _handle_requests(self) -> None:
        assert self.ledger is not None
        for request in self.ledger.pending_requests():
            handler = self._request_handlers.get(request["command"])
            try:
                if handler is None:
                    result = f"error: this daemon has no handler for {request['command']!r} requests"
                else:
                    result = handler(request["argument"])
            except (LookupError, ValueError) as exc:
                result = f"error: {exc.args[0] if exc.args else exc}"
            except Exception as exc:  # noqa: BLE001 - one failing request must not block the others
                log.exception("operator request failed", command=request["command"], argument=request["argument"])
                result = f"error: {type(exc).__name__}: {exc}"
            self.ledger.finish_request(request["id"], result)
            log.info("operator request", command=request["command"], argument=request["argument"], result=result)

    # -- stopping -------------------------------------------------------------------------------------

    def _drain(self) -> None:
        assert self.pool is not None and self.ledger is not None
        self.metrics.set_phase("stopping")
        busy = self.pool.busy()
        log.info("stopping: intake closed", reason=self._stop_reason, running_jobs=len(busy),
                 grace_seconds=self.config.grace_seconds)
        for source in self._sources:
            try:
                source.stop()
            except Exception:
                log.exception("source stop failed", source=getattr(source, "name", repr(source)))
        self.pool.stop_spawning()
        if self._grace_deadline is None:
            self._grace_deadline = time.monotonic() + self.config.grace_seconds
        while self.pool.busy() and time.monotonic() < self._grace_deadline:
            try:
                self._handle(self._events.get(timeout=TICK_SECONDS))
            except queue.Empty:
                pass
        leftover = self.pool.kill_busy("shutdown: grace period over")
        for job_id in leftover:
            self.ledger.requeue_job(job_id)
        if leftover:
            log.warning("jobs still running at the end of the grace period were put back in the queue",
                        jobs=leftover)
        self.pool.stop()

    def _close(self) -> None:
        self._hasher.shutdown(wait=False, cancel_futures=True)
        for sink in self._sinks:
            try:
                sink.close()
            except Exception:
                log.exception("sink close failed", sink=type(sink).__name__)
        if self.pool is not None:
            self.pool.stop(timeout=1.0)
        self.metrics.shutdown()
        if self.ledger is not None:
            self.ledger.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("daemon stopped", reason=self._stop_reason)


def _reraise(exc: BaseException) -> None:
    raise exc


def remove_partial_files(root: Path) -> int:
    """Delete the temporary files and folders (``.<name>.*.part``) that killed writers left under ``root``."""
    import shutil  # noqa: PLC0415

    removed = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [d for d in dirnames if d.startswith(".") and d.endswith(".part")]:
            shutil.rmtree(os.path.join(dirpath, name), ignore_errors=True)
            dirnames.remove(name)
            removed += 1
        for name in filenames:
            if name.startswith(".") and name.endswith(".part"):
                try:
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def build_daemon(config: DaemonConfig) -> Daemon:
    """A Daemon with the components whose config sections are present (see COMPONENTS)."""
    daemon = Daemon(config)
    from .requeue import attach as attach_crds_policy  # noqa: PLC0415 - CRDS context changes (always on)

    attach_crds_policy(daemon)
    for section, target in COMPONENTS.items():
        if section in config.sections:
            module, _, function = target.partition(":")
            getattr(importlib.import_module(module), function)(daemon)
    return daemon


def cmd_daemon(args: argparse.Namespace, extra: list[str]) -> int:
    """Handler of ``calstream daemon``; exit 0 after a clean stop, 2 for bad settings."""
    from .logs import configure  # noqa: PLC0415

    if extra:
        print(f"calstream: error: unknown arguments: {extra}", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"calstream: error: {exc}", file=sys.stderr)
        return 2
    level = args.log_level if getattr(args, "log_level", "WARNING") != "WARNING" else config.log_level
    config.log_level = level
    configure(level=level, json=args.log_json if args.log_json is not None else config.log_json)
    try:
        return build_daemon(config).run()
    except DaemonError as exc:
        print(f"calstream: error: {exc}", file=sys.stderr)
        return 1


__all__ = ["COMPONENTS", "Daemon", "DaemonError", "build_daemon", "cmd_daemon",
           "remove_partial_files"]
