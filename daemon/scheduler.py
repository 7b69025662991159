"""What runs next: stage cascade, association readiness, admission by workers and memory.

* detector1 is queued for every exposure (each ``-segNNN`` on its own) when it arrives;
* image2 when its rate exists, for the imaging EXP_TYPEs calstream calibrates; any other
  EXP_TYPE gets a *skipped* image2 job with the reason, logged at WARNING (never silent);
* image3 when every member of an association has a current cal product and no member is still
  being (re)processed; members may arrive before or after the asn file. An association that waits
  longer than ``stuck_after`` is marked stuck (it still completes if its members arrive);
  :meth:`Scheduler.force` runs it with the members it has.

Admission: one job per worker; the estimated memory of the running jobs (from the array shapes in
the headers, see :func:`estimate_job_bytes`) stays within the budget — a job larger than the whole
budget still runs, alone. The live lane goes before the reprocess lane.

Everything here changes the ledger inside the caller's transaction; the scheduler never touches
files or processes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import structlog

from .ledger import AssociationRecord, ExposureRow, JobRecord, JobSpec, Ledger, ProductRecord

log = structlog.get_logger("calstream.daemon.scheduler")

#: EXP_TYPE -> stage-2 pipeline calstream implements; mirrors calstream.steps.image2.IMAGING_EXP_TYPES
#: (a test keeps them equal; the daemon's main process does not import the science modules)
STAGE2_PIPELINES: dict[str, str] = {"NRC_IMAGE": "calwebb_image2"}
#: asn_type -> stage-3 pipeline calstream implements
STAGE3_PIPELINES: dict[str, str] = {"image3": "calwebb_image3"}

MIB = 1 << 20
#: memory of a job beyond the worker's own footprint [bytes]
JOB_OVERHEAD = 64 * MIB
#: detector1 keeps about this many rows of every group in flight (chunk + halo)
DETECTOR1_ROWS_IN_FLIGHT = 160


def estimate_job_bytes(stage: str, shape: Iterable[int], n_members: int = 1) -> int:
    """Working memory of a job [bytes] from the uncal SCI shape (nints, ngroups, ny, nx).

    detector1 streams rows: ~12 bytes per group-pixel of the rows in flight (uint16 in, float32
    work, uint8 group DQ, two scratch copies) plus the rate/rateints products (5 float32 planes
    each). image2 holds ~16 float32 planes of one image; image3 ~10 per member plus the mosaic.
    """
    dims = [int(v) for v in shape]
    nints, ngroups, ny, nx = ([1] * (4 - len(dims)) + dims)[-4:]
    plane = ny * nx * 4
    if stage == "detector1":
        return JOB_OVERHEAD + 12 * nints * ngroups * min(ny, DETECTOR1_ROWS_IN_FLIGHT) * nx + 5 * plane * (1 + nints)
    if stage == "image2":
        return JOB_OVERHEAD + 16 * plane
    return JOB_OVERHEAD + 10 * plane * max(1, n_members) + 8 * plane


@dataclass(frozen=True)
class Readiness:
    """Which members of an association have their cal product and which do not (yet)."""

    cal_products: tuple[ProductRecord, ...]
    missing: tuple[str, ...]          # member expnames without a current cal product
    busy: tuple[str, ...]             # members with a queued/running job (being (re)processed)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.busy


class Scheduler:
    """Stage decisions and admission over a ledger."""

    def __init__(self, ledger: Ledger, *, workers: int, memory_budget: int, stuck_after: float) -> None:
        self.ledger = ledger
        self.workers = workers
        self.memory_budget = memory_budget
        self.stuck_after = stuck_after
        #: optional ``gate(asn) -> bool``: False = another daemon owns this association's stage 3
        #: (Kafka scale-out, see kafka_associations.AssociationRouter.owns)
        self.stage3_gate: Callable[[AssociationRecord], bool] | None = None
        self._lock = threading.Lock()
        self._backlog = 0
        self._reserved = 0

    # -- cascade --------------------------------------------------------------------------------

    def exposure_arrived(self, exposure_id: int, lane: str = "live") -> int:
        """Queue detector1 for a new exposure; returns the job id."""
        return self.ledger.enqueue(JobSpec.exposure(exposure_id, "detector1", reason="arrival"), lane=lane)

    def after_job(self, job: JobRecord) -> list[AssociationRecord]:
        """Follow-ups of a job that just finished ``done``: image2 after detector1, association
        checks after image2, a re-check after image3. Returns associations whose state changed."""
        if job.kind == "exposure" and job.stage == "detector1":
            self._queue_stage2(self.ledger.exposure(job.subject_id), job)
            return []
        if job.kind == "exposure" and job.stage == "image2":
            exposure = self.ledger.exposure(job.subject_id)
            return self.refresh_associations(exposure, lane=job.lane)
        if job.kind == "association":
            asn = self.ledger.association(job.subject_id)
            self.ledger.set_association_state(asn.id, "done")
            changed = self.refresh(asn, lane=job.lane)
            return [changed] if changed else []
        return []

    def _queue_stage2(self, exposure: ExposureRow, job: JobRecord) -> None:
        pipeline = STAGE2_PIPELINES.get(exposure.exp_type)
        spec = JobSpec.exposure(exposure.id, "image2", context=job.context, priority=job.priority,
                                reason=f"after detector1 (job {job.id})")
        if pipeline is None:
            reason = (f"no stage 2 pipeline for EXP_TYPE={exposure.exp_type} in calstream yet "
                      f"(calibrated: {', '.join(STAGE2_PIPELINES)})")
            self.ledger.skip(spec, reason, lane=job.lane)
            log.warning("stage 2 SKIPPED", exposure=exposure.stem, exp_type=exposure.exp_type, reason=reason)
            return
        self.ledger.enqueue(spec, lane=job.lane)

    def refresh_associations(self, exposure: ExposureRow, lane: str = "live") -> list[AssociationRecord]:
        """Re-check every association that has ``exposure`` as a member."""
        changed = []
        for asn in self.ledger.associations_with_member(exposure.stem, exposure.exposure_name):
            result = self.refresh(asn, lane=lane)
            if result is not None:
                changed.append(result)
        return changed

    def readiness(self, asn: AssociationRecord) -> Readiness:
        """Current cal products of the members, and the members still missing or busy."""
        cals: list[ProductRecord] = []
        missing: list[str] = []
        busy: list[str] = []
        for member in asn.members:
            exposures = self.ledger.exposures_matching(member.stem)
            whole = [e for e in exposures if e.stem != member.stem]
            if whole and len(whole) < max(e.segment_total or 1 for e in whole):
                missing.append(member.expname)          # not every segment has arrived
                continue
            if not exposures:
                missing.append(member.expname)
                continue
            if self.ledger.active_jobs_for_exposures([e.id for e in exposures]):
                busy.append(member.expname)
            found = [p for e in exposures for p in self.ledger.current_products(exposure_id=e.id, stage="image2")
                     if p.kind == "cal"]
            if len(found) < len(exposures):
                missing.append(member.expname)
            cals.extend(found)
        return Readiness(tuple(cals), tuple(missing), tuple(busy))

    def refresh(self, asn: AssociationRecord, lane: str = "live", now: float | None = None
                ) -> AssociationRecord | None:
        """Queue stage 3 if the association is complete (and not already made from these very
        cal products); mark it stuck when its deadline passed. Returns it when its state changed."""
        now = time.time() if now is None else now
        if asn.state in ("running", "ready", "skipped"):
            return None
        if self.stage3_gate is not None and not self.stage3_gate(asn):
            return None
        if asn.asn_type not in STAGE3_PIPELINES:
            reason = (f"no stage 3 pipeline for asn_type={asn.asn_type!r} in calstream yet "
                      f"(runs: {', '.join(STAGE3_PIPELINES)})")
            self.ledger.set_association_state(asn.id, "skipped", note=reason)
            log.warning("stage 3 SKIPPED", association=asn.asn_id, reason=reason)
            return self.ledger.association(asn.id)
        ready = self.readiness(asn)
        if ready.complete:
            if asn.state == "done" and not self._newer_members(asn, ready):
                return None
            return self._queue_stage3(asn, ready, lane, reason="all members calibrated")
        if asn.state == "waiting" and asn.deadline is not None and now >= asn.deadline and not ready.busy:
            note = f"stuck: {len(ready.missing)} of {len(asn.members)} members missing: {', '.join(ready.missing)}"
            self.ledger.set_association_state(asn.id, "stuck", note=note)
            log.warning("association stuck", association=asn.asn_id, missing=list(ready.missing))
            return self.ledger.association(asn.id)
        return None

    def _newer_members(self, asn: AssociationRecord, ready: Readiness) -> bool:
        made = self.ledger.current_products(association_id=asn.id)
        if not made:
            return True
        first = min(p.id for p in made)
        return any(p.id > first for p in ready.cal_products)

    def _queue_stage3(self, asn: AssociationRecord, ready: Readiness, lane: str, reason: str,
                      forced: bool = False) -> AssociationRecord:
        self.ledger.enqueue(JobSpec.association(asn.id, reason=reason), lane=lane)
        self.ledger.set_association_state(asn.id, "ready", forced=forced or None,
                                          note=reason if forced else None)
        log.info("stage 3 queued", association=asn.asn_id, members=len(ready.cal_products), reason=reason)
        return self.ledger.association(asn.id)

    def check_stuck(self, now: float | None = None) -> list[AssociationRecord]:
        """Mark waiting associations whose deadline passed as stuck."""
        now = time.time() if now is None else now
        changed = []
        for asn in self.ledger.associations_in_state("waiting"):
            if asn.deadline is not None and now >= asn.deadline:
                result = self.refresh(asn, now=now)
                if result is not None:
                    changed.append(result)
        return changed

    def force(self, asn_id: str) -> str:
        """Run stage 3 of an association now with the members that have a cal product."""
        asn = self.ledger.association_by_asn_id(asn_id)
        if asn is None:
            raise LookupError(f"no association {asn_id!r} in the ledger")
        if asn.state in ("running", "ready"):
            return f"association {asn_id} is already {asn.state}"
        if asn.asn_type not in STAGE3_PIPELINES:
            raise LookupError(f"association {asn_id}: no stage 3 pipeline for asn_type={asn.asn_type!r}")
        ready = self.readiness(asn)
        if not ready.cal_products:
            raise LookupError(f"association {asn_id}: no member has a cal product yet; nothing to combine")
        reason = f"forced with {len(ready.cal_products)} cal products; missing: {', '.join(ready.missing) or 'none'}"
        self._queue_stage3(asn, ready, "live", reason=reason, forced=True)
        return f"association {asn_id} queued: {reason}"

    # -- admission ------------------------------------------------------------------------------

    def job_bytes(self, job: JobRecord) -> int:
        """Estimated memory of ``job`` (its stored estimate, else from the exposure shapes)."""
        if job.est_bytes:
            return int(job.est_bytes)
        if job.kind == "exposure":
            return estimate_job_bytes(job.stage, self.ledger.exposure(job.subject_id).shape)
        asn = self.ledger.association(job.subject_id)
        shapes = [e.shape for m in asn.members for e in self.ledger.exposures_matching(m.stem)]
        biggest = max(shapes, key=lambda s: s[-1] * s[-2], default=(1, 1, 2048, 2048))
        return estimate_job_bytes("image3", biggest, n_members=len(shapes))

    def next_jobs(self, free_workers: int, reserved_bytes: int, running: int, now: float | None = None
                  ) -> list[tuple[JobRecord, int]]:
        """Jobs to start now (with their memory estimates), at most ``free_workers``."""
        picked: list[tuple[JobRecord, int]] = []
        if free_workers <= 0:
            return picked
        blocked_lane = None
        for job in self.ledger.queued_jobs(now, limit=max(16, 4 * free_workers)):
            if blocked_lane is not None and job.lane != blocked_lane:
                break             # no lower lane jumps ahead of a job waiting for memory
            need = self.job_bytes(job)
            alone = running == 0 and not picked
            if not alone and reserved_bytes + need > self.memory_budget:
                blocked_lane = job.lane
                continue          # a smaller job of the same lane further down may still fit
            picked.append((job, need))
            reserved_bytes += need
            if len(picked) >= free_workers:
                break
        return picked

    def update_load(self, backlog: int, reserved_bytes: int) -> None:
        """The daemon's current backlog (queued + not yet recorded arrivals) and reserved memory."""
        with self._lock:
            self._backlog, self._reserved = backlog, reserved_bytes

    def has_capacity(self) -> bool:
        """True while the daemon can take more input (thread-safe; the Kafka source pauses
        its partitions when False): a backlog under one job per worker and memory to spare."""
        with self._lock:
            return self._backlog < self.workers and self._reserved < self.memory_budget


__all__ = ["Readiness", "STAGE2_PIPELINES", "STAGE3_PIPELINES", "Scheduler", "estimate_job_bytes"]
