"""Registration of the daemon's commands on the ``calstream`` parser (handlers imported lazily,
so other commands do not pay for the daemon's imports)."""

from __future__ import annotations

import argparse
from typing import Any


def add_daemon_parsers(sub: argparse._SubParsersAction) -> None:
    """``calstream daemon``, ``calstream status`` and ``calstream force``."""
    from .config import add_config_arguments  # noqa: PLC0415
    from .status import add_status_parsers  # noqa: PLC0415

    daemon = sub.add_parser("daemon", help="run the streaming service: inbox folders in, products out",
                            description="Watch inbox folders for *_uncal.fits and *_asn.json and calibrate "
                                        "them continuously. Settings come from --config (TOML), then flags.")
    add_config_arguments(daemon)
    daemon.set_defaults(handler=_cmd_daemon)
    add_status_parsers(sub)


def _cmd_daemon(args: argparse.Namespace, extra: list[str]) -> Any:
    from .service import cmd_daemon  # noqa: PLC0415

    return cmd_daemon(args, extra)
