"""Operator commands for CRDS context changes, and the affected-set plan the daemon runs out of process.

``calstream reprocess --dry-run --from jwst_0001.pmap --to jwst_0002.pmap [--ledger X]`` prints the
exposures and associations a switch would redo, with the references that change, running nothing.
``calstream context use jwst_0042.pmap`` asks the daemon to switch (and re-process what changes);
``calstream context show`` prints the contexts seen, the one in use, and the re-processing progress.

``python -m calstream.daemon.reprocess --plan-json --ledger X --to C`` prints the plan of a switch as
JSON: the daemon runs it in a child process, so its own process never loads crds (~100 MB) and its
main loop keeps dispatching live work while the plan is computed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .affected import Affected, ContextError, affected_associations, affected_exposures, normalize_context
from .cli import EXIT_OK, EXIT_REFERENCE, EXIT_USAGE, _fail
from .ledger import Ledger

CAMPAIGN_KEY = "reprocess.campaign"
WAITING_KEY = "reprocess.waiting"


# ---------------------------------------------------------------------------------------------
# Parsers (registered from cli._parser)
# ---------------------------------------------------------------------------------------------

def add_reprocess_parsers(sub: argparse._SubParsersAction) -> None:
    """``calstream reprocess`` and ``calstream context use|show``."""
    rep = sub.add_parser("reprocess", help="what a CRDS context switch would redo (--dry-run)",
                         description="Prints the exposures and associations whose references differ between "
                                     "two CRDS contexts, from the ledger, with the references that change.")
    rep.add_argument("--dry-run", action="store_true", help="print the plan, run nothing (required)")
    rep.add_argument("--from", dest="old", help="old context (default: the context each product was made with)")
    rep.add_argument("--to", dest="new", required=True, help="new context, e.g. jwst_0002.pmap")
    _common(rep)
    rep.set_defaults(handler=cmd_reprocess)
    ctx = sub.add_parser("context", help="CRDS contexts: show them, or switch the daemon to one")
    ctx_sub = ctx.add_subparsers(dest="context_command", required=True)
    use = ctx_sub.add_parser("use", help="switch the daemon to a context and re-process what it changes")
    use.add_argument("context", help="e.g. jwst_0042.pmap (must be in the local CRDS cache)")
    use.add_argument("--wait", type=float, default=10.0, help="seconds to wait for a running daemon's answer")
    _common(use)
    use.set_defaults(handler=cmd_context_use)
    show = ctx_sub.add_parser("show", help="contexts seen, the one in use, re-processing progress")
    _common(show)
    show.set_defaults(handler=cmd_context_show)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ledger", help="ledger file (default: from --config / ./calstream.toml)")
    parser.add_argument("--config", help="TOML settings file")


def _settings(args: argparse.Namespace) -> tuple[Path, Any]:
    """(ledger path, DaemonConfig or None); sets CRDS_PATH from the config when not set."""
    from .config import ConfigError, load_config  # noqa: PLC0415

    try:
        config = load_config(args.config, {})
    except ConfigError:
        if args.config:
            raise
        config = None
    ledger = Path(args.ledger) if args.ledger else (config.ledger if config else Path("calstream.sqlite"))
    if config is not None and config.crds_path is not None and not os.environ.get("CRDS_PATH"):
        os.environ["CRDS_PATH"] = str(config.crds_path)
    return ledger, config


class _Usage(Exception):
    """A command-line problem (exit code 2)."""


def _open(args: argparse.Namespace, extra: list[str], *, readonly: bool = True) -> tuple[Ledger, Any]:
    """(the ledger, DaemonConfig or None) of a command; :class:`_Usage` for what cannot work."""
    if extra:
        raise _Usage(f"unknown arguments: {extra}")
    try:
        path, config = _settings(args)
        return Ledger(path, readonly=True) if readonly or not path.exists() else Ledger(path), config
    except (FileNotFoundError, ValueError) as exc:
        raise _Usage(str(exc)) from exc


# ---------------------------------------------------------------------------------------------
# reprocess --dry-run
# ---------------------------------------------------------------------------------------------

def cmd_reprocess(args: argparse.Namespace, extra: list[str]) -> int:
    if not args.dry_run:
        return _fail("only --dry-run is supported here; to switch the running daemon use "
                     "`calstream context use CONTEXT`", EXIT_USAGE)
    try:
        ledger, _ = _open(args, extra)
    except _Usage as exc:
        return _fail(str(exc), EXIT_USAGE)
    try:
        records = ledger.exposures_for_reprocessing()
        started = time.perf_counter()
        found = affected_exposures(records, args.old, args.new)
        seconds = time.perf_counter() - started
        print(render_plan(ledger, found, args.old, args.new, len(records), seconds))
    except ContextError as exc:
        return _fail(str(exc), EXIT_REFERENCE)
    finally:
        ledger.close()
    return EXIT_OK


def render_plan(ledger: Ledger, found: Sequence[Affected], old: str | None, new: str, total: int,
                seconds: float | None = None) -> str:
    """The dry-run report: affected exposures (restart stage, changed references), then the
    associations that re-run stage 3."""
    from .status import table  # noqa: PLC0415

    source = normalize_context(old) if old else "the contexts of the current products"
    asn_ids = affected_associations(found)
    timing = f" ({seconds:.2f} s)" if seconds is not None else ""
    lines = [f"CRDS {source} -> {normalize_context(new)}: {len(found)} of {total} exposures affected, "
             f"{len(asn_ids)} association(s) re-run stage 3{timing}"]
    if found:
        rows = []
        for item in found:
            for i, change in enumerate(item.changes):
                rows.append((item.stem if i == 0 else "", item.restart_stage if i == 0 else "",
                             change.reftype, change.old, change.new))
        lines += ["", "exposures"] + table(("exposure", "restart", "reftype", "old", "new"), rows)
    if asn_ids:
        rows = []
        for asn_id in asn_ids:
            asn = ledger.association(asn_id)
            members = [a.stem for a in found if asn_id in a.associations]
            rows.append((asn.asn_id, asn.product_name, f"{len(members)} of {len(asn.members)}",
                         ", ".join(members)))
        lines += ["", "associations (stage 3 after their members)"] + table(
            ("asn_id", "product", "affected members", "exposures"), rows)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The plan of a switch, as JSON (run by the daemon in a child process)
# ---------------------------------------------------------------------------------------------

def plan(ledger: Ledger, new: str, exposure_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """Affected exposures of a switch to ``new`` (each stage against the context its products were
    made with); exposures with queued/running jobs are left out and listed as ``busy``."""
    records = ledger.exposures_for_reprocessing()
    if exposure_ids is not None:
        wanted = set(exposure_ids)
        records = [r for r in records if r.exposure_id in wanted]
    busy = ledger.busy_exposures() & {r.exposure_id for r in records}
    idle = [r for r in records if r.exposure_id not in busy]
    found = affected_exposures(idle, None, new)
    return {"context": normalize_context(new), "exposures": len(records), "busy": sorted(busy),
            "affected": [_affected_json(a) for a in found]}


def _affected_json(item: Affected) -> dict[str, Any]:
    return {"exposure_id": item.exposure_id, "stem": item.stem, "restart_stage": item.restart_stage,
            "changes": [list(c) for c in item.changes], "associations": list(item.associations)}


def affected_from_json(data: dict[str, Any]) -> Affected:
    from .affected import ReferenceChange  # noqa: PLC0415

    return Affected(int(data["exposure_id"]), data["stem"], data["restart_stage"],
                    tuple(ReferenceChange(*c) for c in data["changes"]), tuple(data["associations"]))


def _plan_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m calstream.daemon.reprocess")
    parser.add_argument("--plan-json", action="store_true", required=True)
    parser.add_argument("--ledger", required=True)
    parser.add_argument("--to", dest="new", required=True)
    parser.add_argument("--exposures", help="comma-separated exposure ids (default: all)")
    args = parser.parse_args(argv)
    ids = [int(x) for x in args.exposures.split(",") if x] if args.exposures else None
    ledger = Ledger(args.ledger, readonly=True)
    try:
        result = plan(ledger, args.new, ids)
    except ContextError as exc:
        print(json.dumps({"error": str(exc)}))
        return EXIT_REFERENCE
    finally:
        ledger.close()
    print(json.dumps(result))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# context use / show
# ---------------------------------------------------------------------------------------------

def cmd_context_use(args: argparse.Namespace, extra: list[str]) -> int:
    from .status import answer_request, daemon_pid  # noqa: PLC0415

    try:
        ledger, _ = _open(args, extra, readonly=False)
    except _Usage as exc:
        return _fail(str(exc), EXIT_USAGE)
    try:
        context = normalize_context(args.context)
        crds_path = os.environ.get("CRDS_PATH")
        if crds_path and not (Path(crds_path) / "mappings" / "jwst" / context).is_file():
            return _fail(f"context {context} is not in the local CRDS cache {crds_path} (sync it first)",
                         EXIT_REFERENCE)
        request_id = ledger.add_request("context", context)
        if daemon_pid(ledger.path) is None:
            print(f"request {request_id} recorded: the daemon switches to {context} when it starts")
            return EXIT_OK
        return answer_request(ledger, request_id, args.wait)
    finally:
        ledger.close()


def cmd_context_show(args: argparse.Namespace, extra: list[str]) -> int:
    from .crds_watch import operational_context  # noqa: PLC0415
    from .status import table  # noqa: PLC0415

    try:
        ledger, config = _open(args, extra)
    except _Usage as exc:
        return _fail(str(exc), EXIT_USAGE)
    try:
        crds_path = os.environ.get("CRDS_PATH")
        pin = (config.crds_context if config else None) or os.environ.get("CRDS_CONTEXT")
        policy = (config.section("crds").get("policy") if config else None) or "auto"
        lines = [f"in use: {ledger.active_context() or 'none recorded yet'}"
                 + (f"  (pinned: {pin})" if pin else "") + f"; policy {policy}"]
        if crds_path:
            lines.append(f"CRDS cache {crds_path}: operational context {operational_context(crds_path) or '?'}")
        rows = [(c["context"], c["origin"] or "", _when(c["first_seen"]), _when(c["seen_at"]),
                 "yes" if c["active"] else "") for c in ledger.contexts()]
        if rows:
            lines += ["", "contexts seen"] + table(("context", "origin", "first seen", "last seen", "in use"), rows)
        lines += [""] + progress_lines(ledger)
        print("\n".join(lines))
    finally:
        ledger.close()
    return EXIT_OK


def _when(at: float | None) -> str:
    return "" if at is None else _dt.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")


# ---------------------------------------------------------------------------------------------
# Progress (status, context show, metrics)
# ---------------------------------------------------------------------------------------------

def campaign(ledger: Ledger) -> dict[str, Any] | None:
    """The latest re-processing campaign recorded by the daemon (None: never)."""
    raw = ledger.get_meta(CAMPAIGN_KEY)
    return None if raw is None else json.loads(raw)


def progress(ledger: Ledger) -> dict[str, Any] | None:
    """Affected exposures/associations of the latest campaign, jobs redone and remaining."""
    info = campaign(ledger)
    if info is None:
        return None
    counts = ledger.lane_job_counts("reprocess", int(info["after_job_id"]))
    by_state: dict[str, int] = {}
    for (_, state), n in counts.items():
        by_state[state] = by_state.get(state, 0) + n
    finished = sum(by_state.get(s, 0) for s in ("done", "failed", "quarantined", "skipped"))
    active = by_state.get("queued", 0) + by_state.get("running", 0)
    planned = int(info["planned_jobs"])
    return {**info, "redone": by_state.get("done", 0), "failed": by_state.get("failed", 0),
            "queued": by_state.get("queued", 0), "running": by_state.get("running", 0),
            "remaining": max(planned - finished, active)}


def progress_lines(ledger: Ledger) -> list[str]:
    """Re-processing progress as status lines."""
    info = progress(ledger)
    waiting = json.loads(ledger.get_meta(WAITING_KEY) or "[]")
    tail = ([f"announced, waiting for the operator: {', '.join(waiting)} (`calstream context use CONTEXT`)"]
            if waiting else [])
    if info is None:
        return ["re-processing: none so far"] + tail
    stages = ", ".join(f"{n} from {s}" for s, n in sorted(info["restart"].items())) or "none"
    lines = [f"re-processing to {info['context']} (from {', '.join(info['from']) or '-'}, {info['origin']}, "
             f"{_when(info['started_at'])}): affected {info['exposures']} exposure(s) ({stages}), "
             f"{info['associations']} association(s)",
             f"  jobs: redone {info['redone']} of {info['planned_jobs']}, failed {info['failed']}, "
             f"remaining {info['remaining']} (queued {info['queued']}, running {info['running']})"]
    return lines + tail


if __name__ == "__main__":
    sys.exit(_plan_main(sys.argv[1:]))


__all__ = ["CAMPAIGN_KEY", "WAITING_KEY", "add_reprocess_parsers", "affected_from_json", "campaign", "cmd_context_show",
           "cmd_context_use", "cmd_reprocess", "plan", "progress", "progress_lines", "render_plan"]
