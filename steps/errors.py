"""Errors raised by calstream's science code.

Two families matter to the daemon: :class:`InputError` (the input itself is bad: never retried,
quarantined) and everything else (possibly transient: retried).
"""

from __future__ import annotations

from pathlib import Path


class CalstreamError(Exception):
    """Base class of every error calstream raises on purpose."""


class InputError(CalstreamError):
    """The input file is unusable: names the file and the problem. Not retriable."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class ReferenceFileError(CalstreamError):
    """A reference file could not be selected or read (CRDS NOT FOUND, bad shape, ...).

    Not retriable: the same input and context give the same answer.
    """

    def __init__(self, reftype: str, problem: str, path: str | Path | None = None) -> None:
        self.reftype = reftype
        self.path = str(path) if path is not None else None
        self.problem = problem
        where = f" ({self.path})" if self.path else ""
        super().__init__(f"reference '{reftype}'{where}: {problem}")


class ParameterError(CalstreamError, ValueError):
    """A step parameter is unknown or has a value of the wrong type."""


class StepNotImplementedError(CalstreamError, NotImplementedError):
    """A step or a step option that calstream does not implement (yet) was requested."""
