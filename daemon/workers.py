"""A pool of worker processes: one job per worker at a time, recycled after N jobs, killed at a
time limit.

Workers are started with multiprocessing's "spawn" method (a fresh interpreter: no inherited
locks, threads or CRDS caches), import the stage modules once, then serve tasks from a pipe and
answer with small result dicts (:func:`calstream.daemon.jobs.run_task`). Each worker has one
thread in the daemon that reads its results and reports them, and its exit, through
``on_message`` — the daemon's main thread does everything else. Workers ignore SIGINT/SIGTERM
(the daemon decides when they stop) and die with the daemon (Linux PR_SET_PDEATHSIG), so a
``kill -9`` of the daemon leaves no orphan writing products.

Messages: ``{"type": "ready", "worker", "pid"}``, the result of each task (``"type": "result"``,
see jobs.py), ``{"type": "exit", "worker", "exitcode"}`` when a worker process ended.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable, Mapping

import structlog

log = structlog.get_logger("calstream.daemon.workers")


@dataclass
class Worker:
    """The daemon's view of one worker process."""

    serial: int
    process: Any
    tasks: Connection
    job_id: int | None = None
    started: float | None = None
    jobs_done: int = 0
    ready: bool = False
    retiring: bool = False
    kill_reason: str | None = None
    thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def busy(self) -> bool:
        return self.job_id is not None


class WorkerPool:
    """``size`` worker processes; use from the daemon's main thread (``on_message`` is called
    from reader threads and must only enqueue)."""

    def __init__(self, size: int, on_message: Callable[[dict[str, Any]], None], *, recycle_after: int = 50,
                 env: Mapping[str, str] | None = None, log_level: str = "INFO", log_json: bool | None = None) -> None:
        self.size = size
        self.on_message = on_message
        self.recycle_after = recycle_after
        self.env = dict(env or {})
        self.log_level = log_level
        self.log_json = log_json
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: dict[int, Worker] = {}
        self._serial = 0
        self._stopping = False
        self.start_failures = 0                 # consecutive workers that died before being ready
        self._respawn_at: float | None = None

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        for _ in range(self.size):
            self._spawn()

    def _spawn(self) -> Worker:
        self._serial += 1
        serial = self._serial
        task_recv, task_send = self._ctx.Pipe(duplex=False)
        result_recv, result_send = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(target=worker_main, name=f"calstream-worker-{serial}",
                                    args=(serial, task_recv, result_send, self.log_level, self.log_json, self.env),
                                    daemon=True)
        process.start()
        task_recv.close()
        result_send.close()
        worker = Worker(serial, process, task_send)
        worker.thread = threading.Thread(target=self._read, args=(worker, result_recv),
                                         name=f"worker-{serial} results", daemon=True)
        worker.thread.start()
        self._workers[serial] = worker
        log.debug("worker started", worker=serial, pid=process.pid)
        return worker

    def _read(self, worker: Worker, results: Connection) -> None:
        """Reader thread: forward every message, then the exit."""
        while True:
            try:
                message = results.recv()
            except (EOFError, OSError):
                break
            self.on_message(message)
        worker.process.join()
        self.on_message({"type": "exit", "worker": worker.serial, "exitcode": worker.process.exitcode})

    def stop_spawning(self) -> None:
        """No replacements from now on (the daemon is stopping)."""
        self._stopping = True

    def stop(self, timeout: float = 10.0) -> None:
        """Ask idle workers to leave, kill any that do not within ``timeout``."""
        self._stopping = True
        for worker in list(self._workers.values()):
            if not worker.ready and not worker.busy:
                worker.process.kill()           # still importing: nothing to finish
            else:
                self._send(worker, None)
        deadline = time.monotonic() + timeout
        for worker in list(self._workers.values()):
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(5)
        self._workers.clear()

    # -- the daemon's side of messages ------------------------------------------------------------

    def on_ready(self, serial: int) -> None:
        worker = self._workers.get(serial)
        if worker is not None:
            worker.ready = True

    def on_result(self, serial: int) -> int | None:
        """A worker finished its job: it is free again (or retired). Returns the job id."""
        worker = self._workers.get(serial)
        if worker is None:
            return None
        job_id, worker.job_id, worker.started = worker.job_id, None, None
        worker.jobs_done += 1
        if worker.jobs_done >= self.recycle_after and not self._stopping:
            self._retire(worker)
        return job_id

    def on_exit(self, serial: int, exitcode: int | None) -> tuple[int | None, str]:
        """A worker process ended. Returns (its unfinished job id or None, why it ended); a
        replacement is started unless the pool is stopping."""
        worker = self._workers.pop(serial, None)
        if worker is None:
            return None, "unknown worker"
        reason = worker.kill_reason or ("retired" if worker.retiring else f"worker process ended (exit code {exitcode})")
        if worker.busy or not worker.retiring:
            log.warning("worker ended", worker=serial, exitcode=exitcode, job=worker.job_id, reason=reason)
        else:
            log.info("worker retired", worker=serial, jobs=worker.jobs_done)
        if worker.ready or worker.kill_reason:
            self.start_failures = 0
            self.maintain()
        else:                                   # died while starting: do not respawn in a tight loop
            self.start_failures += 1
            delay = min(60.0, 2.0 ** self.start_failures)
            self._respawn_at = time.monotonic() + delay
            log.error("worker died before it was ready; retrying later", worker=serial, exitcode=exitcode,
                      failures=self.start_failures, retry_in=delay)
        return worker.job_id, reason

    def maintain(self) -> None:
        """Start replacements up to the pool size (after any back-off from failed starts)."""
        if self._stopping or (self._respawn_at is not None and time.monotonic() < self._respawn_at):
            return
        self._respawn_at = None
        while len(self._live()) < self.size:
            self._spawn()

    def _retire(self, worker: Worker) -> None:
        worker.retiring = True
        self._send(worker, None)
        if not self._stopping:
            self._spawn()

    def recycle_all(self) -> None:
        """Replace every worker after its current job (e.g. to drop per-process CRDS caches)."""
        for worker in list(self._live()):
            if worker.busy:
                worker.jobs_done = self.recycle_after   # retires when its result comes
            else:
                self._retire(worker)

    # -- jobs ---------------------------------------------------------------------------------------

    def _live(self) -> list[Worker]:
        return [w for w in self._workers.values() if not w.retiring]

    def idle(self) -> list[Worker]:
        """Workers that can take a job now (started, maybe still importing)."""
        return [w for w in self._live() if not w.busy and w.process.is_alive()]

    def busy(self) -> list[Worker]:
        return [w for w in self._workers.values() if w.busy]

    def ready_count(self) -> int:
        return sum(1 for w in self._live() if w.ready)

    def assign(self, worker: Worker, job_id: int, task: Mapping[str, Any]) -> int:
        """Send ``task`` to ``worker``; returns the worker's pid."""
        worker.job_id, worker.started, worker.kill_reason = job_id, time.monotonic(), None
        if not self._send(worker, dict(task)):
            worker.kill_reason = "worker pipe closed"
        return int(worker.pid or 0)

    def kill_overdue(self, timeout: float) -> list[int]:
        """Kill workers whose job runs longer than ``timeout`` seconds; returns their job ids
        (the jobs come back through the exit messages)."""
        now, killed = time.monotonic(), []
        for worker in self.busy():
            if worker.started is not None and now - worker.started > timeout and worker.kill_reason is None:
                worker.kill_reason = f"JobTimeout: still running after {timeout:g} s; worker killed"
                worker.process.kill()
                killed.append(worker.job_id)
        return killed

    def kill_busy(self, reason: str) -> list[int]:
        """Kill every busy worker (shutdown after the grace period); returns their job ids."""
        killed = []
        for worker in self.busy():
            worker.kill_reason = reason
            worker.process.kill()
            killed.append(worker.job_id)
        return killed

    @staticmethod
    def _send(worker: Worker, message: Any) -> bool:
        try:
            worker.tasks.send(message)
            return True
        except (BrokenPipeError, OSError):
            return False


# ---------------------------------------------------------------------------------------------
# Inside the worker process
# ---------------------------------------------------------------------------------------------

def worker_main(serial: int, tasks: Connection, results: Connection, log_level: str, log_json: bool | None,
                env: Mapping[str, str]) -> None:
    """Entry point of a worker process: warm up, then run tasks until told to stop."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ.update(env)
    from .jobs import run_task, warm_up  # noqa: PLC0415
    from .logs import configure  # noqa: PLC0415

    configure(level=log_level, json=log_json)
    structlog.contextvars.bind_contextvars(worker=serial)
    started = time.perf_counter()
    warm_up()
    results.send({"type": "ready", "worker": serial, "pid": os.getpid(), "seconds": time.perf_counter() - started})
    while True:
        try:
            task = tasks.recv()
        except (EOFError, OSError):
            break
        if task is None:
            break
        result = run_task(task)
        result["worker"] = serial
        result["maxrss"] = _maxrss()
        try:
            results.send(result)
        except (BrokenPipeError, OSError):
            break
    _leave()


def _leave() -> None:
    """End the worker without the interpreter's teardown (freeing numba/LLVM state takes ~1 s);
    every product is already renamed into place and every message sent."""
    import logging  # noqa: PLC0415
    import sys  # noqa: PLC0415
    from multiprocessing import util  # noqa: PLC0415

    util._run_finalizers()      # unlink named semaphores (crds creates one at import)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _maxrss() -> int:
    """Peak resident memory of this process [bytes]."""
    import resource  # noqa: PLC0415

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the daemon process dies (no orphans after kill -9)."""
    try:
        import ctypes  # noqa: PLC0415

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() == 1:      # the parent died before prctl took effect
            os._exit(1)
    except (OSError, AttributeError):
        pass


__all__ = ["Worker", "WorkerPool", "worker_main"]
