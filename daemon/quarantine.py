"""Quarantine: a bad input moves to the quarantine folder with ``<name>.error.json`` beside it.

The error file says what is wrong (file, stage, error class, message, time, traceback summary)
and is written first, through a temporary name and a rename; then the input is moved. A file that
already vanished still gets its error file.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def quarantine_file(path: str | Path, folder: str | Path, *, stage: str, error_class: str, message: str,
                    traceback: str | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Move ``path`` into ``folder`` and write its ``.error.json``; returns the new path."""
    path, folder = Path(path), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = _free_name(folder / path.name)
    report = {"file": str(path), "quarantined_as": str(target), "stage": stage, "error_class": error_class,
              "message": message, "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "traceback": traceback, **(extra or {})}
    error_file = target.with_name(target.name + ".error.json")
    _write_json(error_file, report)
    try:
        os.replace(path, target)
    except FileNotFoundError:
        pass                                  # already gone: the error file stands alone
    except OSError as exc:
        if exc.errno != errno.EXDEV:          # e.g. no permission to remove it from the inbox
            error_file.unlink(missing_ok=True)
            raise
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")   # another file system
        try:
            shutil.copy2(path, tmp)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        path.unlink()
    return target


def _free_name(target: Path) -> Path:
    """``target``, or ``name.1``, ``name.2``, ... when a file of that name is already quarantined."""
    if not target.exists():
        return target
    n = 1
    while target.with_name(f"{target.name}.{n}").exists():
        n += 1
    return target.with_name(f"{target.name}.{n}")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


__all__ = ["quarantine_file"]
