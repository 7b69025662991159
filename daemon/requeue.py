"""The daemon's CRDS context policy: detect context changes, re-queue exactly what they change.

Attached to every daemon (:func:`attach`). Context changes come from the local CRDS cache
(:class:`.crds_watch.CacheWatcher` on ``server_config``), the operator (``calstream context use``,
a ledger request), and any component calling :meth:`Daemon.on_context_change` (the Kafka context
topic). Settings, in the ``[crds]`` section of the config file::

    [crds]
    policy = "auto"           # auto: re-process on every switch; manual: new work uses the new
                              # context at once, re-processing waits for `calstream context use`
    history = "history"       # previous product versions: <product folder>/history/<context>/
    watch_seconds = 1.0       # polling period of server_config

A pinned context (``[crds] context`` / ``--crds-context`` / CRDS_CONTEXT) stays in use: announced
contexts are recorded and shown as waiting; ``calstream context use X`` re-pins to X and
re-processes.

On a switch the affected set is computed in a child process (``python -m calstream.daemon.reprocess
--plan-json``: the daemon's own process never loads crds, and keeps dispatching live work
meanwhile). Affected exposures are queued in the ``reprocess`` lane from their restart stage
(image2 starts from the existing rate); the scheduler's cascade then runs image2 after detector1
and stage 3 of every association once its members are redone. Exposures with queued or running
jobs at the switch are re-checked when they are idle. Workers are recycled (fresh crds caches).
Before a job replaces products, the previous versions are linked into the history folder named
by their context (:mod:`.history`) and the ledger rows of those versions point there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import structlog
from prometheus_client import Gauge

from .affected import Affected, normalize_context
from .crds_watch import CacheWatcher, operational_context
from .history import DEFAULT_HISTORY, in_history, keep_version
from .ledger import JobRecord, JobSpec, Ledger
from .reprocess import CAMPAIGN_KEY, WAITING_KEY, affected_from_json, progress

if TYPE_CHECKING:
    from .service import Daemon

log = structlog.get_logger("calstream.daemon.requeue")

POLICIES = ("auto", "manual")
TARGET_KEY = "reprocess.target"        # the context re-processing was approved for
SETTLED_KEY = "reprocess.settled"      # the context every idle exposure was checked against
OPERATOR_ORIGINS = ("operator", "config")
PLAN_TIMEOUT = 600.0


def attach(daemon: "Daemon") -> "Requeue":
    """Install the CRDS context policy on ``daemon`` (before it runs)."""
    return Requeue(daemon)


class Requeue:
    """Context policy, re-processing campaigns, product history, progress metrics."""

    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon
        cfg = daemon.config
        section = cfg.section("crds")
        self.policy = str(section.get("policy", "auto")).lower()
        if self.policy not in POLICIES:
            from .service import DaemonError  # noqa: PLC0415 - service imports this module

            raise DaemonError(f"[crds] policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        self.history = str(section.get("history", DEFAULT_HISTORY))
        self.watch_seconds = float(section.get("watch_seconds", 1.0))
        if cfg.crds_context is None and os.environ.get("CRDS_CONTEXT", "").endswith(".pmap"):
            cfg.crds_context = os.environ["CRDS_CONTEXT"]      # the environment pin, honoured like the config's
        if cfg.crds_context is not None:
            cfg.crds_context = normalize_context(cfg.crds_context)
        self.pinned = cfg.crds_context is not None
        self.in_use: str | None = cfg.crds_context
        self.deferred: set[int] = set()
        self._planning: str | None = None
        self._replan: tuple[str, str] | None = None
        self._started = False
        self._watcher: CacheWatcher | None = None
        self._ticker = threading.Event()
        registry = daemon.metrics.registry
        self.g_affected = Gauge("calstream_reprocess_affected", "Exposures/associations the latest CRDS "
                                "context switch affects", ["kind"], registry=registry)
        self.g_redone = Gauge("calstream_reprocess_redone", "Re-processing jobs done (latest switch)",
                              registry=registry)
        self.g_remaining = Gauge("calstream_reprocess_remaining", "Re-processing jobs still to run (latest switch)",
                                 registry=registry)
        daemon.add_context_listener(self.on_context)
        daemon.add_pre_dispatch(self.keep_history)
        daemon.add_request_handler("context", self.on_operator)
        daemon.call_soon(self.start)

    # -- set-up ---------------------------------------------------------------------------------

    @property
    def ledger(self) -> Ledger:
        assert self.daemon.ledger is not None
        return self.daemon.ledger

    @property
    def crds_path(self) -> Path | None:
        value = self.daemon.config.crds_path or os.environ.get("CRDS_PATH")
        return Path(value) if value else None

    def start(self) -> None:
        """Main thread, once the ledger is open: settle the context in use, watch the cache,
        resume an interrupted campaign."""
        if self._started:
            return
        self._started = True
        cache = operational_context(self.crds_path) if self.crds_path else None
        if self.in_use is None:
            self.in_use = self.ledger.active_context() or cache
            if self.in_use and self.ledger.active_context() is None:
                self.ledger.record_context(self.in_use, "cache", active=True)
        if self.pinned or self.policy == "auto":
            self.ledger.set_meta(TARGET_KEY, self.in_use or "")   # a pin is the operator's choice
        if self.in_use and self.ledger.last_job_id() == 0:
            self.ledger.set_meta(SETTLED_KEY, self.in_use)         # a new ledger: nothing made yet
        log.info("CRDS context policy", in_use=self.in_use, pinned=self.pinned, policy=self.policy,
                 cache_operational=cache, history=self.history)
        if cache and cache != self.in_use:
            self.daemon.on_context_change(cache, "cache")         # synced while the daemon was down
        elif self._resume_needed():
            self._plan(self.in_use, "restart")
        if self.crds_path is not None:
            self._watcher = CacheWatcher(self.crds_path, lambda c: self.daemon.on_context_change(c, "cache"),
                                         interval=self.watch_seconds, current=cache)
            self._watcher.start()
        threading.Thread(target=self._tick_loop, name="crds-requeue-tick", daemon=True).start()

    def _resume_needed(self) -> bool:
        target = self.ledger.get_meta(TARGET_KEY)
        return (self.in_use is not None and target == self.in_use
                and self.ledger.get_meta(SETTLED_KEY) != self.in_use and self.ledger.last_job_id() > 0)

    # -- context changes ------------------------------------------------------------------------

    def on_context(self, context: str, origin: str, daemon: "Daemon") -> None:
        """Listener of :meth:`Daemon.on_context_change` (main thread; the ledger already records
        ``context`` as the active one)."""
        if not self._started:
            self.in_use = normalize_context(context)      # the start-up pin, recorded by the daemon
            return
        context = normalize_context(context)
        operator = origin in OPERATOR_ORIGINS
        if context == self.in_use and not operator and context in (self.ledger.get_meta(SETTLED_KEY),
                                                                   self.ledger.get_meta(TARGET_KEY)):
            return                      # announced again (a replayed topic, a rewritten server_config),
                                        # settled or with its campaign under way: nothing new to plan
        if not self._available(context):
            self._keep_previous_active()
            self._wait_for(context)
            log.warning("CRDS context announced but not in the local cache; waiting for a sync",
                        context=context, origin=origin, crds_path=str(self.crds_path))
            return
        if self.pinned and not operator:
            self._keep_previous_active()
            self._wait_for(context)
            log.warning("CRDS context announced while the context is pinned: recorded, re-processing waits "
                        "for the operator", context=context, origin=origin, pinned=self.in_use)
            return
        previous, self.in_use = self.in_use, context
        if self.pinned:
            self.daemon.config.crds_context = context           # the operator re-pins
        self._waiting_done(context)
        if previous != context:
            log.info("CRDS context switch", previous=previous, context=context, origin=origin)
            self.daemon.recycle_workers()                        # fresh processes: fresh crds caches
        if self.policy == "auto" or operator:
            self.ledger.set_meta(TARGET_KEY, context)
            self._plan(context, origin, previous=previous)
        else:
            self._wait_for(context)
            log.warning("CRDS context in use for new work; re-processing waits for the operator (policy manual)",
                        context=context)

    def on_operator(self, argument: str | None) -> str:
        """Request handler of ``calstream context use X``."""
        if not argument:
            return "error: no context given"
        context = normalize_context(argument)
        if not self._available(context):
            return f"error: context {context} is not in the local CRDS cache {self.crds_path}"
        self.daemon.on_context_change(context, "operator")
        return f"context {context} in use; re-processing planned (see `calstream context show`)"

    def _available(self, context: str) -> bool:
        if self.crds_path is None:
            return True
        return (self.crds_path / "mappings" / "jwst" / context).is_file()

    def _keep_previous_active(self) -> None:
        """The context in use stays the ledger's active one (its recorded origin unchanged)."""
        if self.in_use is not None:
            origin = next((c["origin"] for c in self.ledger.contexts() if c["context"] == self.in_use), None)
            self.ledger.record_context(self.in_use, origin or "in use", active=True)

    def _wait_for(self, context: str) -> None:
        waiting = json.loads(self.ledger.get_meta(WAITING_KEY) or "[]")
        if context not in waiting:
            self.ledger.set_meta(WAITING_KEY, json.dumps(waiting + [context]))

    def _waiting_done(self, context: str) -> None:
        waiting = json.loads(self.ledger.get_meta(WAITING_KEY) or "[]")
        if context in waiting:
            self.ledger.set_meta(WAITING_KEY, json.dumps([c for c in waiting if c != context]))

    # -- planning (child process) and queueing --------------------------------------------------

    def _plan(self, context: str, origin: str, previous: str | None = None,
              exposures: Iterable[int] | None = None) -> None:
        """Compute the affected set of a switch to ``context`` off the main thread."""
        if self._planning is not None:
            self._replan = (context, origin)           # the running plan's result is then discarded
            return
        self._planning = context
        ids = sorted(exposures) if exposures is not None else None
        threading.Thread(target=self._run_plan, args=(context, origin, previous, ids),
                         name="crds-requeue-plan", daemon=True).start()

    def _run_plan(self, context: str, origin: str, previous: str | None, ids: list[int] | None) -> None:
        started = time.perf_counter()
        cmd = [sys.executable, "-m", "calstream.daemon.reprocess", "--plan-json", "--ledger",
               str(self.daemon.config.ledger), "--to", context]
        if ids is not None:
            cmd += ["--exposures", ",".join(map(str, ids))]
        env = dict(os.environ)
        if self.crds_path is not None:
            env["CRDS_PATH"] = str(self.crds_path)
        env.pop("CRDS_CONTEXT", None)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=PLAN_TIMEOUT)
            result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {
                "error": f"plan process exited {proc.returncode}: {proc.stderr.strip()[-500:]}"}
        except (subprocess.TimeoutExpired, OSError, json.JSONDecodeError) as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
        result["seconds"] = time.perf_counter() - started
        self.daemon.call_soon(lambda: self._apply(context, origin, previous, ids, result))

    def _apply(self, context: str, origin: str, previous: str | None, ids: list[int] | None,
               result: dict[str, Any]) -> None:
        """Main thread: queue the plan's re-runs (unless a newer switch superseded it)."""
        self._planning = None
        replan, self._replan = self._replan, None
        if replan is not None and (replan[0] != context or ids is not None):
            self._plan(*replan)
            return
        if context != self.in_use:
            return
        if "error" in result:
            log.error("re-processing plan failed", context=context, error=result["error"])
            self.daemon.metrics.errors.labels("ReprocessPlanError").inc()
            return
        found = [affected_from_json(a) for a in result["affected"]]
        busy = set(result["busy"])
        if origin == "restart" and not (found or busy or self.deferred):
            self.ledger.set_meta(SETTLED_KEY, context)    # every product already matches: no campaign
            log.info("context check after restart: nothing to re-process", context=context,
                     checked=result.get("exposures"))
            return
        extend = ids is not None or origin == "restart"      # add to the campaign under way
        with self.ledger.transaction():
            info = self._campaign(context, origin, previous, found, extend)
            for item in found:
                self.ledger.enqueue(JobSpec.exposure(item.exposure_id, item.restart_stage,
                                                     reason=_reason(context, item)), lane="reprocess")
            self.ledger.set_meta(CAMPAIGN_KEY, json.dumps(info))
            self.deferred = (self.deferred - set(ids or ())) | busy if extend else busy
            if not self.deferred:
                self.ledger.set_meta(SETTLED_KEY, context)
        log.info("re-processing queued", context=context, origin=origin, exposures=len(found),
                 associations=len({a for f in found for a in f.associations}), deferred_busy=len(busy),
                 checked=result.get("exposures"), plan_seconds=round(result["seconds"], 2))
        self._update_metrics()

    def _campaign(self, context: str, origin: str, previous: str | None, found: list[Affected],
                  extend: bool) -> dict[str, Any]:
        """The campaign record (``meta``): what is affected and how many jobs it plans."""
        info = json.loads(self.ledger.get_meta(CAMPAIGN_KEY) or "null")
        if not extend or info is None or info.get("context") != context:
            info = {"context": context, "origin": origin, "from": [previous] if previous else [],
                    "started_at": time.time(), "after_job_id": self.ledger.last_job_id(), "exposures": 0,
                    "associations": 0, "planned_jobs": 0, "restart": {}, "association_ids": []}
        asns = set(info["association_ids"]) | {a for item in found for a in item.associations}
        info["exposures"] += len(found)
        for item in found:
            info["restart"][item.restart_stage] = info["restart"].get(item.restart_stage, 0) + 1
            info["planned_jobs"] += 2 if item.restart_stage == "detector1" else 1
        info["planned_jobs"] += len(asns) - len(info["association_ids"])
        info["association_ids"] = sorted(asns)
        info["associations"] = len(asns)
        return info

    # -- history --------------------------------------------------------------------------------

    def keep_history(self, job: JobRecord, task: dict) -> None:
        """Pre-dispatch hook: link the versions ``job`` will replace into the history folder and
        point their ledger rows there. Never raises (a failure only loses the history copy)."""
        try:
            if job.kind == "exposure":
                current = self.ledger.current_products(exposure_id=job.subject_id, stage=job.stage)
            else:
                current = self.ledger.current_products(association_id=job.subject_id)
            for product in current:
                if in_history(product.path, self.history) or not Path(product.path).is_file():
                    continue
                kept = keep_version(product.path, product.crds_context, self.daemon.config.output_dir,
                                    self.history, product.version)
                self.ledger.set_product_path(product.id, str(kept))
        except Exception:
            log.exception("keeping the previous product version failed", job=job.id)

    # -- periodic -------------------------------------------------------------------------------

    def _tick_loop(self) -> None:
        while not self._ticker.wait(1.0):
            self.daemon.call_soon(self.tick)

    def tick(self) -> None:
        """Main thread, every second: metrics; re-check deferred exposures that became idle."""
        self._update_metrics()
        if self.deferred and self._planning is None and self.in_use:
            idle = self.deferred - self.ledger.busy_exposures()
            if idle:
                self._plan(self.in_use, "deferred", exposures=idle)

    def _update_metrics(self) -> None:
        info = progress(self.ledger)
        if info is None:
            return
        self.g_affected.labels("exposures").set(info["exposures"])
        self.g_affected.labels("associations").set(info["associations"])
        self.g_redone.set(info["redone"])
        self.g_remaining.set(info["remaining"])

    def stop(self) -> None:
        self._ticker.set()
        if self._watcher is not None:
            self._watcher.stop()


def _reason(context: str, item: Affected) -> str:
    changes = "; ".join(f"{c.reftype} {c.old} -> {c.new}" for c in item.changes)
    return f"CRDS {context}: {changes}"[:500]


__all__ = ["POLICIES", "Requeue", "attach"]
