"""Waking up when the handoff folders change: watchdog (inotify) with a slow fallback poll.

watchdog holds a rename *out of* a watched folder — and every later event — for ~0.5 s while it groups
move events, so callers never trust event order: they re-list the folders after every wake-up, and the
fallback poll covers any missed event.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType

from conductor.layout import TASK_SUFFIX

Relevant = Callable[[str, str, bool], bool]
"""``(event type, path, is_directory) -> wake up?``; the path is the destination of a move."""


def task_arrival(event_type: str, path: str, is_directory: bool) -> bool:
    """A task file appearing in a ``pending/`` folder, or a new folder (a plan or fork being created).

    What an idle worker waits for: its own writes and other workers' leases, results and audit lines
    would otherwise wake it on every one of them to list the folders for nothing.
    """
    if event_type not in ("created", "moved"):
        return False
    if is_directory:
        return True
    return path.endswith(TASK_SUFFIX) and os.path.basename(os.path.dirname(path)) == "pending"


class FolderWatcher:
    """Wait for any change below a set of folders.

    Use as a context manager; ``wait(timeout)`` returns True when something changed since the last call,
    False when ``timeout`` seconds passed without a change. Falls back to plain sleeping (polling) when
    watchdog cannot start (e.g. inotify watch limits).
    """

    def __init__(self, folders: Iterable[Path], *, relevant: Relevant | None = None,
                 kinds: Iterable[str] | None = None) -> None:
        """Prepare to watch ``folders`` (recursively; each is created if missing).

        Args:
            relevant: which changes wake a waiter (see :func:`task_arrival`); None = any change except
                opening or reading a file and lock files.
            kinds: the only event types to ask the kernel for (``"created"``, ``"moved"``, ``"modified"``,
                ``"deleted"``); None = all. Every other event is never delivered, so a watcher of a busy
                folder does not spend CPU on each write, open and close in it.
        """
        self._folders = [Path(f) for f in folders]
        self._relevant = relevant
        self._kinds = None if kinds is None else tuple(kinds)
        self._changed = threading.Event()
        self._observer = None

    def __enter__(self) -> FolderWatcher:
        try:
            from watchdog import events
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:  # watchdog is a dependency; polling still works without it
            return self
        classes = {"created": (events.FileCreatedEvent, events.DirCreatedEvent),
                   "moved": (events.FileMovedEvent, events.DirMovedEvent),
                   "modified": (events.FileModifiedEvent, events.DirModifiedEvent),
                   "deleted": (events.FileDeletedEvent, events.DirDeletedEvent)}
        event_filter = None if self._kinds is None else [cls for kind in self._kinds for cls in classes[kind]]

        changed, relevant = self._changed, self._relevant

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:  # type: ignore[no-untyped-def]
                if relevant is not None:
                    path = os.fsdecode(getattr(event, "dest_path", "") or event.src_path)
                    if relevant(event.event_type, path, event.is_directory):
                        changed.set()
                    return
                # Opening or reading a file changes nothing, and lock files churn on every pass: waking on
                # them would make every pass trigger the next.
                if event.event_type in ("opened", "closed_no_write"):
                    return
                if str(event.src_path).endswith(".lock"):
                    return
                changed.set()

        observer = Observer()
        try:
            for folder in self._folders:
                folder.mkdir(parents=True, exist_ok=True)
                observer.schedule(_Handler(), str(folder), recursive=True, event_filter=event_filter)
            observer.start()
        except OSError:
            return self
        self._observer = observer
        return self

    def wait(self, timeout: float) -> bool:
        """Block until a change or ``timeout`` seconds; True if something changed."""
        changed = self._changed.wait(timeout)
        self._changed.clear()
        return changed

    def notify(self) -> None:
        """Wake a waiter from another thread (e.g. an in-process executor finished)."""
        self._changed.set()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._observer is not None:
            _quiet_shutdown_race()
            self._observer.stop()
            self._observer.join(timeout=5)


def _quiet_shutdown_race() -> None:
    """watchdog's inotify emitter logs an error when a read returns after the observer stopped; the event
    is simply dropped, so the message (printed by logging's last-resort handler) is noise."""
    logger = logging.getLogger("watchdog.observers.inotify")
    if not any(isinstance(f, _DropInactiveEmitter) for f in logger.filters):
        logger.addFilter(_DropInactiveEmitter())


class _DropInactiveEmitter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()
