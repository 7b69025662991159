"""The ``calstream`` command line: run pipelines and steps, generate synthetic data.

``calstream run calwebb_detector1 X_uncal.fits --output-dir D --steps.jump.rejection_threshold=5``
``calstream run jump X_ramp.fits --rejection_threshold=5``
``calstream run calwebb_image2 X_rate.fits --output-dir D``
``calstream synth --out D --crds-path C``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INPUT, EXIT_REFERENCE, EXIT_NOT_IMPLEMENTED = 0, 1, 2, 3, 4, 5

PIPELINES = ("calwebb_detector1", "calwebb_image2", "calwebb_image3")


def main(argv: Sequence[str] | None = None, *, fast_exit: bool = False) -> int:
    """Parse ``argv`` and run the command; returns the exit code.

    ``fast_exit`` (the console script) ends one-shot commands with :func:`exit_now` instead of
    returning, skipping the interpreter's teardown.
    """
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    if args.crds_path:
        os.environ["CRDS_PATH"] = str(Path(args.crds_path).resolve())
    from .logs import configure  # noqa: PLC0415

    configure(level=args.log_level, json=args.log_json)
    code = int(args.handler(args, extra))
    if fast_exit and getattr(args, "one_shot", False):
        exit_now(code)
    return code


def console() -> None:
    """The ``calstream`` console script."""
    sys.exit(main(fast_exit=True))


def exit_now(code: int) -> None:
    """Flush output and leave without the interpreter's teardown.

    Products are already renamed into place when a one-shot command returns; what is left is
    freeing numba/LLVM and module state, ~0.8 s for a full-frame detector1 run.
    """
    import logging  # noqa: PLC0415

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calstream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crds-path", help="local CRDS cache (sets CRDS_PATH)")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--log-json", action="store_true", default=None, help="JSON log lines")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run a pipeline or a single step on one file",
                         description="Parameters: --steps.<step>.<name>=<value> for pipelines, "
                                     "--<name>=<value> for a single step.")
    run.add_argument("name", help="calwebb_detector1, calwebb_image2 or a detector1 step name (jump, ...)")
    run.add_argument("input", help="input file (uncal, ramp; rate for calwebb_image2)")
    run.add_argument("--output-dir", default=".", help="where products go (default: .)")
    run.add_argument("--config", help="parameter file (jwst-style ASDF or TOML with [steps.<name>])")
    run.add_argument("--crds-context", help="pin the CRDS context (else CRDS_CONTEXT, else the cache's)")
    run.add_argument("--chunk-rows", type=int, default=None,
                     help="rows processed at a time (default: calstream.steps.detector1.DEFAULT_CHUNK_ROWS)")
    run.add_argument("--fsync", action="store_true",
                     help="fsync products before renaming them into place (durable against power loss)")
    run.set_defaults(handler=_cmd_run, one_shot=True)

    demo = sub.add_parser("demo", help="generate a small observation and calibrate it (the README's main job)")
    demo.add_argument("--workdir", default="demo-output")
    demo.add_argument("--subarray", default="SUB640")
    demo.set_defaults(handler=_cmd_demo)

    synth = sub.add_parser("synth", help="generate synthetic NIRCam exposures, references and a CRDS cache")
    synth.add_argument("--out", required=True, help="folder for the uncal files")
    synth.add_argument("--detector", action="append", dest="detectors", help="e.g. NRCA1 (repeatable)")
    synth.add_argument("--subarray", default="SUB160")
    synth.add_argument("--readpatt", default="RAPID")
    synth.add_argument("--ngroups", type=int, default=10)
    synth.add_argument("--nints", type=int, default=1)
    synth.add_argument("--exposures", type=int, default=1)
    synth.add_argument("--segments", type=int, default=1)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(handler=_cmd_synth)

    from .asn_cli import add_asn_parser  # noqa: PLC0415

    add_asn_parser(sub)
    from .commands import add_daemon_parsers  # noqa: PLC0415

    add_daemon_parsers(sub)
    from .reprocess import add_reprocess_parsers  # noqa: PLC0415

    add_reprocess_parsers(sub)
    return parser


def _cmd_run(args: argparse.Namespace, extra: list[str]) -> int:
    from calstream.steps.errors import (CalstreamError, InputError, ParameterError,  # noqa: PLC0415
                                        ReferenceFileError, StepNotImplementedError)
    from calstream.steps.parameters import parse_cli_overrides  # noqa: PLC0415

    try:
        only_step = None if args.name in PIPELINES else args.name
        if only_step is not None:
            extra = [_as_step_arg(only_step, a) for a in extra]
        cli_steps, cli_pipeline = parse_cli_overrides(extra)
        if only_step is not None and cli_pipeline:
            raise ParameterError(f"unknown arguments for step {only_step}: {sorted(cli_pipeline)}")
        started = time.perf_counter()
        if args.name == "calwebb_image2":
            from calstream.steps.image2 import calibrate_rate_file  # noqa: PLC0415

            result = calibrate_rate_file(args.input, args.output_dir, cli_steps=cli_steps,
                                         cli_pipeline=cli_pipeline, parameter_file=args.config,
                                         context=args.crds_context)
            return _report(result, started)
        if args.name == "calwebb_image3":
            from calstream.steps.image3 import calibrate_association  # noqa: PLC0415

            result = calibrate_association(args.input, args.output_dir, cli_steps=cli_steps,
                                           cli_pipeline=cli_pipeline, parameter_file=args.config,
                                           context=args.crds_context)
            return _report(result, started)
        from calstream.steps.detector1 import calibrate_file  # noqa: PLC0415

        result = calibrate_file(args.input, args.output_dir, only_step=only_step, cli_steps=cli_steps,
                                cli_pipeline=cli_pipeline, parameter_file=args.config,
                                context=args.crds_context, fsync=args.fsync,
                                **({"chunk_rows": args.chunk_rows} if args.chunk_rows else {}))
    except InputError as exc:
        return _fail(f"bad input: {exc}", EXIT_INPUT)
    except ReferenceFileError as exc:
        return _fail(f"reference file problem for {args.input}: {exc}", EXIT_REFERENCE)
    except StepNotImplementedError as exc:
        return _fail(f"not implemented: {exc}", EXIT_NOT_IMPLEMENTED)
    except ParameterError as exc:
        return _fail(f"bad parameter: {exc}", EXIT_USAGE)
    except CalstreamError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    return _report(result, started)


def _report(result: Any, started: float) -> int:
    for kind, path in result.products.items():
        print(f"{kind:9s} {path}")
    skipped = [s for s, v in result.status.items() if v != "COMPLETE"]
    print(f"context   {result.context}; skipped: {', '.join(skipped) or 'none'}; "
          f"{time.perf_counter() - started:.2f} s")
    return EXIT_OK


def _as_step_arg(step: str, arg: str) -> str:
    """``--rejection_threshold=5`` for step jump -> ``--steps.jump.rejection_threshold=5``."""
    if arg.startswith("--") and not arg.startswith("--steps."):
        return f"--steps.{step}.{arg[2:]}"
    return arg


def _fail(message: str, code: int) -> int:
    print(f"calstream: error: {message}", file=sys.stderr)
    return code


def _cmd_synth(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        return _fail(f"unknown arguments: {extra}", EXIT_USAGE)
    crds_root = os.environ.get("CRDS_PATH")
    if not crds_root:
        return _fail("give --crds-path (where the synthetic CRDS cache is written)", EXIT_USAGE)
    from calstream.steps.synth import generate_observation  # noqa: PLC0415

    info = generate_observation(args.out, crds_root, detectors=tuple(args.detectors or ("NRCA1",)),
                                subarray=args.subarray, readpatt=args.readpatt, ngroups=args.ngroups,
                                nints=args.nints, n_exposures=args.exposures, nsegments=args.segments,
                                seed=args.seed)
    print(json.dumps(_jsonable(info), indent=2, default=str))
    return EXIT_OK


def _jsonable(info: Any) -> Any:
    return {"uncal": [str(p) for p in info.uncal_paths], "crds_root": str(info.crds_root),
            "contexts": info.contexts, "operational_context": info.operational_context}


def _cmd_demo(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        return _fail(f"unknown arguments: {extra}", EXIT_USAGE)
    from .demo import print_rows, run_demo  # noqa: PLC0415

    started = time.perf_counter()
    rows = run_demo(args.workdir, subarray=args.subarray)
    print_rows(rows)
    print(f"\nproducts in {Path(args.workdir).resolve() / 'products'}; total {time.perf_counter() - started:.1f} s")
    return EXIT_OK


if __name__ == "__main__":
    console()
