"""Daemon settings: a ``calstream.toml`` file, every setting also a command-line flag.

Layout of the file (relative paths are relative to the file's folder)::

    [daemon]
    inbox = ["/data/inbox"]          # one or more folders watched for *_uncal.fits / *_asn.json
    output_dir = "/data/products"
    ledger = "/data/calstream.sqlite"
    quarantine = "/data/quarantine"
    workers = 2
    memory_budget = "8G"             # bytes, or with a K/M/G/T suffix
    settle_seconds = 2.0
    rescan_seconds = 60.0
    job_timeout = 900.0
    max_tries = 3
    recycle_after = 50
    stuck_after = 3600.0
    metrics_port = 9108              # 0: any free port; "off": no HTTP server
    polling = false

    [crds]
    path = "/data/crds_cache"        # CRDS_PATH of the workers
    context = "jwst_0002.pmap"       # optional pin (else the cache's operational context)

Other sections (``[kafka]``, ...) are kept as raw dicts: ``config.sections["kafka"]``.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

DEFAULT_CONFIG_NAME = "calstream.toml"


class ConfigError(ValueError):
    """A setting is missing, unknown or has a value of the wrong type."""


def default_memory_budget() -> int:
    """Half of the machine's physical memory [bytes]."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)
    except (ValueError, OSError, AttributeError):
        return 4 << 30


@dataclass
class DaemonConfig:
    """Every setting of the daemon. Times in seconds, memory in bytes."""

    inboxes: list[Path] = field(default_factory=lambda: [Path("inbox")])
    output_dir: Path = Path("products")
    ledger: Path = Path("calstream.sqlite")
    quarantine: Path = Path("quarantine")
    workers: int = field(default_factory=lambda: max(1, os.cpu_count() or 1))
    crds_path: Path | None = None
    crds_context: str | None = None
    memory_budget: int = field(default_factory=default_memory_budget)
    settle_seconds: float = 2.0
    rescan_seconds: float = 60.0
    job_timeout: float = 900.0
    max_tries: int = 3
    reference_tries: int = 2
    recycle_after: int = 50
    stuck_after: float = 3600.0
    grace_seconds: float = 60.0
    metrics_port: int | None = 9108
    metrics_host: str = "127.0.0.1"
    polling: bool = False
    log_level: str = "INFO"
    log_json: bool | None = None
    config_path: Path | None = None
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    def section(self, name: str) -> dict[str, Any]:
        """A raw TOML section (``{}`` when absent), e.g. ``config.section("kafka")``."""
        return dict(self.sections.get(name, {}))

    def validate(self) -> "DaemonConfig":
        """Raise ConfigError for values that cannot work; returns self."""
        if not self.inboxes:
            raise ConfigError("at least one inbox folder is needed (--inbox)")
        for name in ("workers", "max_tries", "reference_tries", "recycle_after"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("settle_seconds", "rescan_seconds", "job_timeout", "stuck_after", "grace_seconds"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.memory_budget <= 0:
            raise ConfigError(f"memory_budget must be positive, got {self.memory_budget}")
        out = self.output_dir.resolve()
        for inbox in self.inboxes:
            inbox = inbox.resolve()
            for other, label in ((out, "output_dir"), (self.quarantine.resolve(), "quarantine")):
                if other == inbox or inbox in other.parents:
                    raise ConfigError(f"{label} {other} must not be inside the inbox {inbox}")
        return self


#: [daemon] keys -> DaemonConfig field names (the file uses "inbox", the dataclass "inboxes")
_DAEMON_KEYS = {
    "inbox": "inboxes", "output_dir": "output_dir", "ledger": "ledger", "quarantine": "quarantine",
    "workers": "workers", "memory_budget": "memory_budget", "settle_seconds": "settle_seconds",
    "rescan_seconds": "rescan_seconds", "job_timeout": "job_timeout", "max_tries": "max_tries",
    "reference_tries": "reference_tries", "recycle_after": "recycle_after", "stuck_after": "stuck_after",
    "grace_seconds": "grace_seconds", "metrics_port": "metrics_port", "metrics_host": "metrics_host",
    "polling": "polling", "log_level": "log_level", "log_json": "log_json",
}
_CRDS_KEYS = {"path": "crds_path", "context": "crds_context"}
_PATH_FIELDS = ("output_dir", "ledger", "quarantine", "crds_path")


def parse_bytes(value: Any) -> int:
    """``"8G"``, ``"512M"``, ``"4GiB"``, ``1048576`` -> bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"memory size must be a number of bytes or e.g. '8G', got {value!r}")
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?b)?\s*", str(value), re.IGNORECASE)
    if not match:
        raise ConfigError(f"memory size must be a number of bytes or e.g. '8G', got {value!r}")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def parse_port(value: Any) -> int | None:
    """Port number; ``"off"``/``"none"``/``false`` disable the HTTP server (None)."""
    if value is None or value is False or str(value).strip().lower() in ("off", "none", "no", "false"):
        return None
    try:
        port = int(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"metrics_port must be a port number or 'off', got {value!r}") from exc
    if not 0 <= port < 65536:
        raise ConfigError(f"metrics_port out of range: {port}")
    return port


def _coerce(name: str, value: Any, base: Path) -> Any:
    """Convert a raw TOML/CLI value to the type of DaemonConfig field ``name``."""
    try:
        if name == "inboxes":
            items = [value] if isinstance(value, (str, os.PathLike)) else list(value)
            return [_path(v, base) for v in items]
        if name in _PATH_FIELDS:
            return None if value in (None, "") else _path(value, base)
        if name == "memory_budget":
            return parse_bytes(value)
        if name == "metrics_port":
            return parse_port(value)
        if name in ("workers", "max_tries", "reference_tries", "recycle_after"):
            if isinstance(value, bool) or int(value) != float(value):
                raise ValueError(value)
            return int(value)
        if name in ("settle_seconds", "rescan_seconds", "job_timeout", "stuck_after", "grace_seconds"):
            return float(value)
        if name in ("polling",):
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if name == "log_json":
            return None if value is None else bool(value)
        return None if value is None else str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}: cannot use {value!r} ({exc})") from exc


def _path(value: Any, base: Path) -> Path:
    path = Path(os.path.expanduser(str(value)))
    return path if path.is_absolute() else base / path


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
                *, search_cwd: bool = True) -> DaemonConfig:
    """Defaults, then the TOML file (``path``, else ./calstream.toml if present), then ``overrides``.

    ``overrides`` uses DaemonConfig field names (None values are ignored); relative paths in
    overrides are relative to the current directory.
    """
    config = DaemonConfig()
    if path is None and search_cwd and Path(DEFAULT_CONFIG_NAME).is_file():
        path = DEFAULT_CONFIG_NAME
    if path is not None:
        config = _apply_file(config, Path(path))
    known = {f.name for f in fields(DaemonConfig)} - {"sections", "config_path"}
    changes: dict[str, Any] = {}
    for name, value in (overrides or {}).items():
        if name not in known:
            raise ConfigError(f"unknown setting {name!r}")
        if value is not None:
            changes[name] = _coerce(name, value, Path.cwd())
    config = replace(config, **changes)
    return _absolute(config).validate()


def _absolute(config: DaemonConfig) -> DaemonConfig:
    """Every path made absolute (relative to the current directory), so workers agree."""
    paths = {name: getattr(config, name).resolve() for name in _PATH_FIELDS if getattr(config, name) is not None}
    return replace(config, inboxes=[p.resolve() for p in config.inboxes], **paths)


def _apply_file(config: DaemonConfig, path: Path) -> DaemonConfig:
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
    base = path.resolve().parent
    changes: dict[str, Any] = {}
    for section, table in (("daemon", _DAEMON_KEYS), ("crds", _CRDS_KEYS)):
        values = raw.get(section, {})
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path}: [{section}] must be a table")
        for key, value in values.items():
            if key in table:
                changes[table[key]] = _coerce(table[key], value, base)
            elif section == "daemon":
                raise ConfigError(f"config file {path}: unknown setting {key!r} in [daemon]; "
                                  f"known: {', '.join(sorted(table))}")
    sections = {k: v for k, v in raw.items() if isinstance(v, dict)}
    return replace(config, config_path=path.resolve(), sections=sections, **changes)


# ---------------------------------------------------------------------------------------------
# Command line: every setting also a flag
# ---------------------------------------------------------------------------------------------

#: flag -> (DaemonConfig field, argparse keyword arguments)
CLI_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--inbox": ("inboxes", {"action": "append", "help": "folder watched for arrivals (repeatable)"}),
    "--output-dir": ("output_dir", {"help": "root of the product tree"}),
    "--ledger": ("ledger", {"help": "SQLite ledger file"}),
    "--quarantine": ("quarantine", {"help": "folder for bad inputs (+ <name>.error.json)"}),
    "--workers": ("workers", {"type": int, "help": "worker processes (default: CPU count)"}),
    "--crds-path": ("crds_path", {"help": "local CRDS cache for the workers (CRDS_PATH)"}),
    "--crds-context": ("crds_context", {"help": "pin the CRDS context, e.g. jwst_0002.pmap"}),
    "--memory-budget": ("memory_budget", {"help": "memory for running jobs, e.g. 8G (default: half the RAM)"}),
    "--settle-seconds": ("settle_seconds", {"type": float, "help": "unchanged size+mtime for this long = complete"}),
    "--rescan-seconds": ("rescan_seconds", {"type": float, "help": "period of the inbox rescans"}),
    "--job-timeout": ("job_timeout", {"type": float, "help": "a job running longer is killed and retried"}),
    "--max-tries": ("max_tries", {"type": int, "help": "tries of a retriable job before it fails"}),
    "--recycle-after": ("recycle_after", {"type": int, "help": "jobs per worker process before it is replaced"}),
    "--stuck-after": ("stuck_after", {"type": float, "help": "an association waiting longer is marked stuck"}),
    "--grace-seconds": ("grace_seconds", {"type": float, "help": "SIGTERM: time running jobs get to finish"}),
    "--metrics-port": ("metrics_port", {"help": "port of /metrics and /healthz (0: any free port, off: none)"}),
    "--metrics-host": ("metrics_host", {"help": "address the HTTP server binds (default 127.0.0.1)"}),
    "--polling": ("polling", {"action": "store_const", "const": True,
                              "help": "polling observer (network file systems) instead of inotify"}),
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` plus one flag per setting (dest ``cfg_<field>`` so no global flag is shadowed)."""
    parser.add_argument("--config", help=f"TOML settings file (default: ./{DEFAULT_CONFIG_NAME} if present)")
    for flag, (name, kwargs) in CLI_FLAGS.items():
        if kwargs.get("action") != "store_const":
            kwargs = {"metavar": flag[2:].upper().replace("-", "_"), **kwargs}
        parser.add_argument(flag, dest=f"cfg_{name}", default=None, **kwargs)


def config_from_args(args: argparse.Namespace) -> DaemonConfig:
    """The DaemonConfig for parsed arguments (file, then flags)."""
    overrides = {name: getattr(args, f"cfg_{name}", None) for name, _ in CLI_FLAGS.values()}
    return load_config(getattr(args, "config", None), overrides)


__all__ = ["CLI_FLAGS", "ConfigError", "DaemonConfig", "add_config_arguments", "config_from_args",
           "load_config", "parse_bytes", "parse_port"]
