"""Kafka message formats: arrivals and CRDS context announcements in, event keys out.

Arrival message (JSON object, on the arrivals topic)::

    {"path": "/shared/inbox/jw..._uncal.fits"}            # or "uri": "file:///shared/inbox/..."
    {"path": "...", "kind": "uncal", "checksum": "sha256:<hex>", "size": 123456}

``kind`` ("uncal" | "asn") is inferred from the name when absent; the path must be absolute (every
daemon reads the same shared storage). Context announcement (contexts topic)::

    {"context": "jwst_0002.pmap"}

Anything else raises :class:`MessageError` with the reason; the source publishes it as an error
event and commits the message (a bad message never blocks its partition).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Mapping
from urllib.parse import unquote, urlparse

from .intake import name_stem
from .sources import input_kind

CONTEXT_PATTERN = re.compile(r"^[a-z]+_\d{4,}\.pmap$")
_KINDS = ("uncal", "asn")


class MessageError(ValueError):
    """A message that cannot be used; the text says why."""


@dataclass(frozen=True)
class ArrivalMessage:
    """A parsed arrival: the file on shared storage and what the producer claims about it."""

    path: Path
    kind: str
    checksum: str | None = None
    size: int | None = None


def _json_object(raw: bytes | None) -> Mapping[str, Any]:
    if raw is None:
        raise MessageError("empty message (no value)")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise MessageError(f"not UTF-8 text ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise MessageError(f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise MessageError(f"expected a JSON object, got {type(data).__name__}")
    return data


def parse_arrival(raw: bytes | None) -> ArrivalMessage:
    """Validate an arrival message (no file system access); MessageError with the reason."""
    data = _json_object(raw)
    path = _arrival_path(data)
    kind = data.get("kind")
    if kind is None:
        kind = input_kind(path.name)
        if kind is None:
            raise MessageError(f"cannot tell the kind of {path.name!r}: give \"kind\" (uncal or asn) "
                               "or a *_uncal.fits / *_asn.json name")
    elif kind not in _KINDS:
        raise MessageError(f"\"kind\" must be one of {_KINDS}, got {kind!r}")
    checksum = data.get("checksum")
    if checksum is not None and not (isinstance(checksum, str)
                                     and re.fullmatch(r"(sha256:)?[0-9a-fA-F]{64}", checksum)):
        raise MessageError(f"\"checksum\" must be sha256:<64 hex digits>, got {checksum!r}")
    size = data.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise MessageError(f"\"size\" must be a non-negative integer of bytes, got {size!r}")
    return ArrivalMessage(path=path, kind=kind, checksum=checksum, size=size)


def _arrival_path(data: Mapping[str, Any]) -> Path:
    if "path" in data and "uri" in data:
        raise MessageError("give \"path\" or \"uri\", not both")
    if "uri" in data:
        uri = data["uri"]
        if not isinstance(uri, str):
            raise MessageError(f"\"uri\" must be a string, got {uri!r}")
        parts = urlparse(uri)
        if parts.scheme != "file":
            raise MessageError(f"only file:// URIs are supported (shared storage), got {uri!r}")
        if parts.netloc not in ("", "localhost"):
            raise MessageError(f"file URI with a remote host {parts.netloc!r} is not supported: {uri!r}")
        text = unquote(parts.path)
    elif "path" in data:
        text = data["path"]
        if not isinstance(text, str):
            raise MessageError(f"\"path\" must be a string, got {text!r}")
    else:
        raise MessageError("no \"path\" or \"uri\" of the input file")
    if not text or not PurePosixPath(text).is_absolute():
        raise MessageError(f"the input path must be absolute (shared storage), got {text!r}")
    return Path(text)


def parse_context(raw: bytes | None) -> str:
    """The CRDS context of an announcement, e.g. "jwst_0002.pmap"; MessageError otherwise."""
    data = _json_object(raw)
    context = data.get("context")
    if not isinstance(context, str) or not CONTEXT_PATTERN.match(context):
        raise MessageError(f"\"context\" must name a pipeline mapping like jwst_0002.pmap, got {context!r}")
    return context


def encode_event(event: Mapping[str, Any]) -> bytes:
    """Compact JSON (UTF-8) of an event; paths and other objects as strings."""
    return json.dumps(dict(event), separators=(",", ":"), default=str).encode("utf-8")


def origin_of(record: Any) -> str:
    """``kafka:<topic>/<partition>/<offset>`` of a consumer record."""
    return f"kafka:{record.topic}/{record.partition}/{record.offset}"


def file_stem(path: str | None) -> str | None:
    """``/x/jw..._nrca1_uncal.fits`` -> ``jw..._nrca1`` (the exposure a file belongs to)."""
    if not path:
        return None
    return name_stem(PurePosixPath(str(path)).name) or None


def event_key(event: Mapping[str, Any]) -> str | None:
    """The Kafka key of a product or error event: its exposure (stage 1/2), else its association
    (stage 3), else the exposure named by its file, so one subject's events stay in order."""
    subject = event.get("exposure") or event.get("association")
    return str(subject) if subject else file_stem(event.get("path"))


__all__ = ["ArrivalMessage", "CONTEXT_PATTERN", "MessageError", "encode_event", "event_key", "file_stem",
           "origin_of", "parse_arrival", "parse_context"]
