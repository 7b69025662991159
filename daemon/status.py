"""``calstream status`` and ``calstream force``: the ledger for operators.

``status`` prints the queue by lane, per-stage job counts, stuck associations and recent errors as
tables, from the ledger alone (read-only; works while the daemon runs). ``force <asn_id>`` runs the
stage 3 of an association with the members it has: a running daemon picks the request up within a
second; with no daemon running, the job is queued directly and runs at the next start.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from .config import ConfigError, load_config
from .ledger import STAGES, Ledger

JOB_COLUMNS = ("queued", "running", "done", "failed", "quarantined", "skipped")


def add_status_parsers(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser("status", help="queue, per-stage counts, stuck associations, recent errors")
    _ledger_arguments(status)
    status.add_argument("--errors", type=int, default=10, help="how many recent errors to show")
    status.set_defaults(handler=cmd_status)
    force = sub.add_parser("force", help="run the stage 3 of an association now with the members it has")
    force.add_argument("asn_id", help="association id (asn_id in the *_asn.json)")
    _ledger_arguments(force)
    force.add_argument("--wait", type=float, default=10.0, help="seconds to wait for a running daemon's answer")
    force.set_defaults(handler=cmd_force)


def _ledger_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ledger", help="ledger file (default: from --config / ./calstream.toml)")
    parser.add_argument("--config", help="TOML settings file")


def ledger_path(args: argparse.Namespace) -> Path:
    if args.ledger:
        return Path(args.ledger)
    return load_config(args.config, {}).ledger


def daemon_pid(ledger: Path) -> int | None:
    """The pid of the daemon using ``ledger`` if it is alive (from the lock file)."""
    try:
        pid = int(Path(f"{ledger}.lock").read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid if Path(f"/proc/{pid}").exists() or sys.platform != "linux" else None


# ---------------------------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------------------------

def cmd_status(args: argparse.Namespace, extra: list[str]) -> int:
    try:
        path = ledger_path(args)
        ledger = Ledger(path, readonly=True)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"calstream: error: {exc}", file=sys.stderr)
        return 2
    try:
        print(render_status(ledger, daemon_pid(path), errors=args.errors), flush=True)
    except BrokenPipeError:                 # `calstream status | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        ledger.close()
    return 0


def render_status(ledger: Ledger, pid: int | None = None, errors: int = 10) -> str:
    """The status report as text."""
    lines = [f"ledger {ledger.path}  —  daemon " + (f"running (pid {pid})" if pid else "not running")]
    context = ledger.active_context()
    if context:
        lines.append(f"CRDS context {context}")
    lanes = ledger.queue_by_lane()
    lines += ["", "queue"] + table(("lane", "queued"), [(lane, lanes.get(lane, 0)) for lane in ("live", "reprocess")])
    counts = ledger.stage_counts()
    rows = [(stage, *(counts.get((stage, s), 0) for s in JOB_COLUMNS)) for stage in STAGES]
    lines += ["", "jobs by stage"] + table(("stage", *JOB_COLUMNS), rows)
    inputs = ledger.input_counts()
    asns = ledger.association_counts()
    lines += ["", "inputs: " + (", ".join(f"{k} {v}" for k, v in sorted(inputs.items())) or "none"),
              "associations: " + (", ".join(f"{k} {v}" for k, v in sorted(asns.items())) or "none")]
    from .reprocess import progress_lines  # noqa: PLC0415

    lines += ["", *progress_lines(ledger)]
    stuck = ledger.associations_in_state("stuck", "waiting")
    if stuck:
        now = time.time()
        rows = [(a.asn_id, a.state, a.product_name, len(a.members),
                 _age(now - a.created_at), (a.note or "")[:160]) for a in stuck]
        lines += ["", "waiting / stuck associations"] + table(
            ("asn_id", "state", "product", "members", "waiting", "note"), rows)
    recent = ledger.recent_errors(errors)
    if recent:
        rows = [(_clock(e.at), e.stage or "", e.error_class, e.outcome or "", Path(e.path).name if e.path else "",
                 (e.message or "").replace("\n", " ")[:80]) for e in recent]
        lines += ["", "recent errors"] + table(("time", "stage", "class", "outcome", "file", "message"), rows)
    return "\n".join(lines)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Left-aligned text columns, two spaces apart."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    out.insert(1, "  " + "  ".join("-" * w for w in widths))
    return out


def _clock(at: float) -> str:
    return _dt.datetime.fromtimestamp(at).strftime("%H:%M:%S")


def _age(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


# ---------------------------------------------------------------------------------------------
# force
# ---------------------------------------------------------------------------------------------

def cmd_force(args: argparse.Namespace, extra: list[str]) -> int:
    try:
        path = ledger_path(args)
    except ConfigError as exc:
        print(f"calstream: error: {exc}", file=sys.stderr)
        return 2
    if not path.exists():
        print(f"calstream: error: ledger {path} does not exist", file=sys.stderr)
        return 2
    if daemon_pid(path) is None:
        return _force_offline(path, args.asn_id)
    ledger = Ledger(path)
    try:
        return answer_request(ledger, ledger.add_request("force", args.asn_id), args.wait)
    finally:
        ledger.close()


def answer_request(ledger: Ledger, request_id: int, wait: float) -> int:
    """Wait up to ``wait`` seconds for a running daemon to answer an operator request; print the
    answer. Exit code 1 for an answer starting with "error", else 0 (also when unanswered)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        request = ledger.request(request_id)
        if request and request["handled_at"] is not None:
            print(request["result"])
            return 1 if request["result"].startswith("error") else 0
        time.sleep(0.1)
    print(f"request {request_id} recorded; the daemon has not answered within {wait:g} s")
    return 0


def _force_offline(path: Path, asn_id: str) -> int:
    from .scheduler import Scheduler  # noqa: PLC0415

    ledger = Ledger(path)
    try:
        with ledger.transaction():
            message = Scheduler(ledger, workers=1, memory_budget=1, stuck_after=0).force(asn_id)
    except LookupError as exc:
        print(f"calstream: error: {exc.args[0]}", file=sys.stderr)
        return 1
    finally:
        ledger.close()
    print(f"{message} (no daemon running: it runs at the next start)")
    return 0


__all__ = ["add_status_parsers", "answer_request", "cmd_force", "cmd_status", "render_status", "table"]
