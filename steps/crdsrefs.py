"""Reference-file selection through the real ``crds`` library against a local cache.

``crds`` reads CRDS_PATH / CRDS_SERVER_URL when it is imported, so it is imported lazily, after
the caller (CLI, daemon, tests) has set the environment. Offline, an unset CRDS_SERVER_URL is
pointed at a "serverless" URL so crds never opens a socket.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

from .errors import ReferenceFileError

OBSERVATORY = "jwst"
NOT_APPLICABLE = "N/A"


def _crds() -> Any:
    os.environ.setdefault("CRDS_SERVER_URL", "https://crds-serverless-mode.stsci.edu")
    os.environ.setdefault("CRDS_OBSERVATORY", OBSERVATORY)
    import crds  # noqa: PLC0415 - must follow the environment set-up above

    return crds


def context_name(context: str | None = None) -> str:
    """The context a selection uses: ``context`` > CRDS_CONTEXT > the cache's server_config."""
    crds = _crds()
    if context:
        return context
    try:
        return str(crds.get_context_name(OBSERVATORY))
    except Exception as exc:  # crds raises a zoo of types for a missing/broken cache
        raise ReferenceFileError("context", f"cannot determine the CRDS context "
                                            f"(CRDS_PATH={os.environ.get('CRDS_PATH')!r}): {exc}") from exc


def crds_version() -> str:
    return str(_crds().__version__)


def select_references(params: Mapping[str, Any], reftypes: Iterable[str],
                      context: str | None = None) -> dict[str, str]:
    """Best references for an exposure: ``{reftype: local path or 'N/A'}``.

    ``params`` are the exposure's CRDS parameters (FITS keywords or META.* names). Raises
    :class:`ReferenceFileError` naming the reference type when CRDS finds no match or the file
    is not in the local cache.
    """
    crds = _crds()
    reftypes = [r.lower() for r in reftypes]
    if not reftypes:
        return {}
    ctx = context_name(context)
    try:
        found = crds.getreferences(dict(params), reftypes=reftypes, context=ctx, observatory=OBSERVATORY)
    except crds.CrdsLookupError as exc:
        raise ReferenceFileError(_failing_type(str(exc), reftypes), f"CRDS {ctx} has no match: {exc}") from exc
    except Exception as exc:  # network/download attempts for files absent from the cache, bad rules
        raise ReferenceFileError(_failing_type(str(exc), reftypes),
                                 f"not available in the local CRDS cache under {ctx}: {exc}") from exc
    out: dict[str, str] = {}
    for reftype in reftypes:
        value = str(found.get(reftype, NOT_APPLICABLE))
        out[reftype] = NOT_APPLICABLE if value.upper().startswith(("N/A", "NOT FOUND N/A")) else value
    return out


def recommendations(params: Mapping[str, Any], reftypes: Iterable[str], context: str) -> dict[str, str]:
    """Best reference *names* under ``context`` without touching files (for affected-set checks).

    Values are basenames, 'N/A', or 'NOT FOUND ...' strings as crds returns them.
    """
    crds = _crds()
    return {k: str(v) for k, v in crds.getrecommendations(
        dict(params), reftypes=[r.lower() for r in reftypes], context=context,
        observatory=OBSERVATORY, fast=True).items()}


def _failing_type(message: str, reftypes: list[str]) -> str:
    lowered = message.lower()
    for reftype in reftypes:
        if reftype in lowered:
            return reftype
    return ",".join(reftypes)


def reference_uri(path: str) -> str:
    """The provenance value for an R_<type> keyword: crds://<name> for cache files, else the path."""
    if path == NOT_APPLICABLE:
        return NOT_APPLICABLE
    crds_path = os.environ.get("CRDS_PATH")
    if crds_path and os.path.abspath(path).startswith(os.path.abspath(crds_path) + os.sep):
        return "crds://" + os.path.basename(path)
    return os.path.abspath(path)
