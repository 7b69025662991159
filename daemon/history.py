"""Previous versions of products: kept under a history folder named by the CRDS context that made them.

Before a job replaces a product (the steps write the new file to a temporary name and rename it over
the old one, so readers always see one complete version), the current file is hard-linked into
``<product folder>/<history>/<context>/<name>`` (or, when ``history`` is an absolute folder,
``<history>/<context>/<path below the output root>``). Linking is atomic and copies nothing; where a
link is impossible (another file system) the file is copied to a temporary name and renamed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

DEFAULT_HISTORY = "history"
UNKNOWN_CONTEXT = "unknown-context"


def history_path(product: str | os.PathLike, context: str | None, output_root: str | os.PathLike,
                 history: str = DEFAULT_HISTORY) -> Path:
    """Where the version of ``product`` made under ``context`` is kept."""
    product = Path(product)
    folder = context or UNKNOWN_CONTEXT
    base = Path(history)
    if base.is_absolute():
        try:
            relative = product.parent.relative_to(output_root)
        except ValueError:
            relative = Path()
        return base / folder / relative / product.name
    return product.parent / base / folder / product.name


def in_history(product: str | os.PathLike, history: str = DEFAULT_HISTORY) -> bool:
    """True for a file that already lives in a history folder."""
    base = Path(history)
    path = Path(product)
    if base.is_absolute():
        return base in path.parents
    context = path.parent.name            # <product folder>/<history>/<context>/<name>
    return (len(path.parents) >= 3 and path.parents[1].name == base.name
            and (context.endswith(".pmap") or context == UNKNOWN_CONTEXT))


def keep_version(product: str | os.PathLike, context: str | None, output_root: str | os.PathLike,
                 history: str = DEFAULT_HISTORY, version: int | None = None) -> Path:
    """Link (or copy) ``product`` into its history folder; returns the kept file.

    A different file already kept under the same name (the same context made two versions) gets
    ``_v<version>`` before its extension.
    """
    source = Path(product)
    target = history_path(source, context, output_root, history)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        if os.path.samefile(source, target):
            return target
        target = target.with_name(f"{_stem(target.name)}_v{version or 0}{_suffix(target.name)}")
        if target.exists():
            return target
    try:
        os.link(source, target)
    except OSError:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        shutil.copy2(source, tmp)
        os.replace(tmp, target)
    return target


def _stem(name: str) -> str:
    return name.split(".", 1)[0]


def _suffix(name: str) -> str:
    return name[len(_stem(name)):]


__all__ = ["DEFAULT_HISTORY", "history_path", "in_history", "keep_version"]
