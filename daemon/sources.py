"""Where inputs come from: the :class:`Source` protocol, :class:`Arrival`, and folder watching.

A source calls ``submit(arrival)`` for every complete input file it notices; the daemon does the
rest (checksums, duplicates, the ledger). ``submit`` only enqueues, so it is safe from any thread.

:class:`FolderSource` watches an inbox with watchdog. A file counts only when complete:

* inotify (Linux): a close-after-write (or a rename into the inbox) of a file whose content is
  complete (a FITS file as long as its headers say; an asn that parses as JSON) is submitted at once;
* otherwise (polling observer, network file systems, hard links, files found by a rescan) the file
  must keep the same size and mtime for ``settle_seconds``. A FITS file shorter than its headers
  declare waits for ``abandon_seconds`` of no change before it is submitted (and then quarantined
  as truncated by the daemon): a slow writer is never cut off.

The inbox is rescanned at start-up and every ``rescan_seconds`` so files that arrived while the
daemon was down, or whose events were lost, are not missed.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Protocol, runtime_checkable

import structlog

log = structlog.get_logger("calstream.daemon.sources")

FITS_BLOCK = 2880
CARD = 80

Completeness = Literal["complete", "partial", "corrupt"]


@dataclass(frozen=True)
class Arrival:
    """One input file that a source found complete.

    ``kind`` is "uncal" or "asn"; ``origin`` says where it came from ("folder:/data/inbox",
    "kafka:topic/partition/offset"). ``checksum`` ("sha256:<hex>" or bare sha256 hex) is checked
    against the file when given. ``ack(outcome)`` is called once, from the daemon's main thread,
    when the input reached a terminal state durably: "done", "failed", "quarantined" or "duplicate".
    """

    path: Path
    kind: str
    origin: str
    size: int | None = None
    checksum: str | None = None
    ack: Callable[[str], None] | None = None


@runtime_checkable
class Source(Protocol):
    """Something that notices inputs and calls ``submit`` for each (from any thread)."""

    name: str

    def start(self, submit: Callable[[Arrival], None]) -> None: ...

    def stop(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# Names and completeness
# ---------------------------------------------------------------------------------------------

_TEMP_MARKERS = (".part", ".tmp", ".partial", ".crdownload", ".filepart", ".swp", ".download", ".inprogress")


def input_kind(name: str) -> str | None:
    """"uncal" for ``*_uncal.fits``, "asn" for ``*_asn.json``; None for anything else,
    including temporary and partial names (``.x``, ``x.part``, ``x.tmp``, ``x~``, ...)."""
    lower = name.lower()
    if lower.startswith((".", "~")) or lower.endswith("~") or any(m in lower for m in _TEMP_MARKERS):
        return None
    if lower.endswith("_uncal.fits"):
        return "uncal"
    if lower.endswith("_asn.json"):
        return "asn"
    return None


def _card_value(card: bytes) -> str:
    text = card[10:].decode("ascii", "replace")
    return text.split("/", 1)[0].strip()


def fits_expected_size(path: str | Path) -> tuple[Completeness, int | None]:
    """Walk the FITS headers of ``path`` (without reading data) and compare with its length.

    Returns ("complete", size), ("partial", None) when the file is shorter than its headers
    declare, or ("corrupt", None) when it does not start like a FITS file.
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        offset, first = 0, True
        while offset < size:
            fh.seek(offset)
            header_bytes, cards = 0, {}
            while True:
                block = fh.read(FITS_BLOCK)
                if first and not block.startswith(b"SIMPLE  ="[: len(block)]):
                    return "corrupt", None
                if not first and header_bytes == 0 and not block.startswith(b"XTENSION"):
                    return "complete", offset          # trailing bytes after the last HDU
                first = False
                if len(block) < FITS_BLOCK:
                    return "partial", None
                header_bytes += FITS_BLOCK
                end = _parse_cards(block, cards)
                if end:
                    break
            try:
                data = _data_bytes(cards)
            except ValueError:
                return "corrupt", None
            offset += header_bytes + -(-data // FITS_BLOCK) * FITS_BLOCK
        if offset > size:
            return "partial", None
        return ("complete", offset) if offset else ("partial", None)


def _parse_cards(block: bytes, cards: dict[str, str]) -> bool:
    """Collect the structural cards of one header block; True when END was seen."""
    for i in range(0, FITS_BLOCK, CARD):
        card = block[i:i + CARD]
        key = card[:8].decode("ascii", "replace").strip()
        if key == "END":
            return True
        if key in ("BITPIX", "NAXIS", "PCOUNT", "GCOUNT") or (key.startswith("NAXIS") and key[5:].isdigit()):
            cards[key] = _card_value(card)
    return False


def _data_bytes(cards: dict[str, str]) -> int:
    """Data-unit size [bytes] from BITPIX, NAXISn, PCOUNT, GCOUNT (FITS standard 4.4.1)."""
    bitpix = int(cards["BITPIX"])
    naxis = int(cards.get("NAXIS", "0"))
    if naxis == 0:
        return 0
    count = 1
    for n in range(1, naxis + 1):
        count *= int(cards[f"NAXIS{n}"])
    return abs(bitpix) // 8 * int(cards.get("GCOUNT", "1")) * (int(cards.get("PCOUNT", "0")) + count)


def completeness(path: str | Path, kind: str) -> Completeness:
    """Is the content of ``path`` whole? (FITS length vs headers; JSON parses)."""
    try:
        if kind == "asn":
            try:
                json.loads(Path(path).read_bytes())
            except (ValueError, UnicodeDecodeError):
                return "partial"   # cannot tell truncated from bad: settle, then the daemon decides
            return "complete"
        return fits_expected_size(path)[0]
    except FileNotFoundError:
        return "partial"


# ---------------------------------------------------------------------------------------------
# Settle logic (pure: time is passed in)
# ---------------------------------------------------------------------------------------------

@dataclass
class _Watch:
    size: int
    mtime_ns: int
    since: float


class SettleTracker:
    """Files that count once their (size, mtime) stayed the same for ``settle_seconds``."""

    def __init__(self, settle_seconds: float) -> None:
        self.settle_seconds = settle_seconds
        self._watch: dict[Path, _Watch] = {}

    def __len__(self) -> int:
        return len(self._watch)

    def __contains__(self, path: Path) -> bool:
        return path in self._watch

    def observe(self, path: Path, size: int, mtime_ns: int, now: float) -> None:
        """Record the file's current state; any change restarts its settle clock."""
        watch = self._watch.get(path)
        if watch is None or (watch.size, watch.mtime_ns) != (size, mtime_ns):
            self._watch[path] = _Watch(size, mtime_ns, now)

    def settled_for(self, path: Path, now: float) -> float:
        """Seconds the file has been unchanged (0 when not watched)."""
        watch = self._watch.get(path)
        return 0.0 if watch is None else now - watch.since

    def due(self, now: float, after: float | None = None) -> list[Path]:
        """Watched files unchanged for ``after`` (default settle_seconds) or longer."""
        after = self.settle_seconds if after is None else after
        return [p for p, w in self._watch.items() if now - w.since >= after]

    def paths(self) -> list[Path]:
        return list(self._watch)

    def forget(self, path: Path) -> None:
        self._watch.pop(path, None)


# ---------------------------------------------------------------------------------------------
# The folder source
# ---------------------------------------------------------------------------------------------

class FolderSource:
    """Watch ``inbox`` (recursively) for complete ``*_uncal.fits`` and ``*_asn.json`` files."""

    def __init__(self, inbox: str | Path, *, settle_seconds: float = 2.0, rescan_seconds: float = 60.0,
                 polling: bool = False, abandon_seconds: float | None = None) -> None:
        self.inbox = Path(inbox).resolve()
        self.name = f"folder:{self.inbox}"
        self.settle_seconds = settle_seconds
        self.rescan_seconds = rescan_seconds
        self.polling = polling
        self.abandon_seconds = abandon_seconds if abandon_seconds is not None else max(60.0, 10 * settle_seconds)
        self._tracker = SettleTracker(settle_seconds)
        self._submitted: dict[Path, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._submit: Callable[[Arrival], None] | None = None
        self._observer = None
        self._thread: threading.Thread | None = None
        self._next_rescan = 0.0

    # -- public -------------------------------------------------------------------------------

    def start(self, submit: Callable[[Arrival], None]) -> None:
        """Rescan the inbox, then watch it until :meth:`stop`."""
        from watchdog.observers import Observer  # noqa: PLC0415
        from watchdog.observers.polling import PollingObserver  # noqa: PLC0415

        self.inbox.mkdir(parents=True, exist_ok=True)
        self._submit = submit
        self._stop.clear()
        observer = PollingObserver(timeout=max(0.2, self.settle_seconds / 4)) if self.polling else Observer()
        observer.schedule(_Handler(self), str(self.inbox), recursive=True)
        observer.daemon = True
        observer.start()
        self._observer = observer
        self.rescan()
        self._next_rescan = time.monotonic() + self.rescan_seconds
        self._thread = threading.Thread(target=self._run, name=f"settle {self.inbox.name}", daemon=True)
        self._thread.start()
        log.info("watching inbox", inbox=str(self.inbox), observer=type(observer).__name__,
                 settle_seconds=self.settle_seconds)

    def stop(self) -> None:
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def rescan(self) -> int:
        """Consider every input file in the inbox; returns how many were submitted now."""
        count = 0
        for path in _walk(self.inbox):
            count += self.consider(path, closed=False)
        return count

    # -- internals ----------------------------------------------------------------------------

    def consider(self, path: Path, *, closed: bool) -> int:
        """Submit ``path`` if it is complete, else track it; ``closed`` = a writer just closed it
        (inotify) or renamed it into place. Returns 1 when submitted."""
        kind = input_kind(path.name)
        if kind is None:
            return 0
        try:
            st = path.stat()
        except FileNotFoundError:
            with self._lock:
                self._tracker.forget(path)
            return 0
        state = (st.st_size, st.st_mtime_ns)
        with self._lock:
            if self._submitted.get(path) == state:
                return 0
            now = time.monotonic()
            self._tracker.observe(path, st.st_size, st.st_mtime_ns, now)
            settled = self._tracker.settled_for(path, now)
        if not (closed and not self.polling) and settled < self.settle_seconds:
            return 0
        content = completeness(path, kind)
        if content == "partial" and settled < self.abandon_seconds:
            return 0
        if content == "partial":
            log.warning("incomplete file unchanged too long: submitting it as it is", path=str(path),
                        seconds=round(settled, 1))
        return self._emit(path, kind, state)

    def _emit(self, path: Path, kind: str, state: tuple[int, int]) -> int:
        with self._lock:
            if self._submitted.get(path) == state:
                return 0
            self._submitted[path] = state
            self._tracker.forget(path)
        assert self._submit is not None
        self._submit(Arrival(path=path, kind=kind, origin=self.name, size=state[0]))
        return 1

    def _run(self) -> None:
        tick = max(0.05, min(0.5, self.settle_seconds / 4))
        while not self._stop.wait(tick):
            try:
                with self._lock:
                    watched = self._tracker.paths()
                for path in watched:
                    self.consider(path, closed=False)
                if time.monotonic() >= self._next_rescan:
                    self._next_rescan = time.monotonic() + self.rescan_seconds
                    self._forget_vanished()
                    self.rescan()
            except Exception:  # never let the watcher die silently
                log.exception("folder source tick failed", inbox=str(self.inbox))

    def _forget_vanished(self) -> None:
        with self._lock:
            for path in [p for p in self._submitted if not p.exists()]:
                del self._submitted[path]


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in sorted(filenames):
            if input_kind(name) is not None:
                yield Path(dirpath) / name


def _handler_base() -> type:
    from watchdog.events import FileSystemEventHandler  # noqa: PLC0415

    return FileSystemEventHandler


class _Handler(_handler_base()):  # type: ignore[misc]
    """watchdog callbacks: only look at the file and enqueue (never block the observer)."""

    def __init__(self, source: FolderSource) -> None:
        super().__init__()
        self.source = source

    def on_closed(self, event) -> None:  # FileClosedEvent: inotify IN_CLOSE_WRITE
        if not event.is_directory:
            self._safe(Path(os.fsdecode(event.src_path)), closed=True)

    def on_moved(self, event) -> None:  # renamed into place: complete by construction
        if not event.is_directory:
            self._safe(Path(os.fsdecode(event.dest_path)), closed=True)

    def on_created(self, event) -> None:
        if not event.is_directory:
            self._safe(Path(os.fsdecode(event.src_path)), closed=False)

    def on_modified(self, event) -> None:
        if not event.is_directory:
            self._safe(Path(os.fsdecode(event.src_path)), closed=False)

    def _safe(self, path: Path, closed: bool) -> None:
        try:
            self.source.consider(path, closed=closed)
        except Exception:
            log.exception("inbox event failed", path=str(path))


__all__ = ["Arrival", "FolderSource", "SettleTracker", "Source", "completeness", "fits_expected_size",
           "input_kind"]
