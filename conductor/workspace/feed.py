"""The change feed of attempt folders: which paths were written since a folder last matched its stat cache,
told by the kernel (inotify(7)) instead of found by a ``stat`` of every file.

A capture (``checkout.capture``) and a reset (``checkout.reset``) list what differs from the stat cache
with one ``git ls-files`` pass over the whole folder: about 0.1 s at 50,000 files, per step. With a feed,
they pass ``git ls-files`` the paths the feed names instead, and git looks at those only: the result is the
same listing, restricted to paths nothing else can have touched.

That holds only while every write to the folder raises an event the feed reads. So a feed is trusted only
under these conditions, and anything else makes its answer None (the caller makes the full pass):

- It starts on a fresh checkout (:func:`start`), before anything ran in the folder, and is carried over a
  reset (:func:`rearm`) only if everything that ran in the folder since it was armed was *contained* and
  said so (:func:`vouch`): an LLM executor in this process, or a sandboxed command whose pid namespace the
  kernel emptied. A straggler process could write through a memory map with no event at all; a contained
  run leaves none. One uncontained run (``sandbox.mode: off``, an external executor, a verification
  command run unsandboxed) ends the folder's feed for good (:func:`drop`).
- Every file has one name: sandboxed commands cannot make hard links (:mod:`conductor.seccomp`). inotify
  reports a write to the folder through which the file was opened, so a second name would hide a write.
- Every folder of the tree is watched: the folders that exist when the feed is armed, and those created
  since (their whole subtree is a changed path, so git lists everything under them). A folder renamed
  within the tree (its watches would report under its old name) or a queue overflow (``IN_Q_OVERFLOW``)
  makes the feed *lost*: its next answer is None, and the next :func:`rearm` watches the tree afresh.
- ``IN_CLOSE_WRITE`` as well as ``IN_MODIFY``: a write through a shared memory map raises no
  ``IN_MODIFY``, but the descriptor it was mapped from was opened for writing, and its close is reported.

One inotify instance serves every folder of this process (``fs.inotify.max_user_instances`` is small);
each watched folder costs one watch (``max_user_watches``; a folder whose watches cannot all be added gets
no feed). The folder's own ``.git`` (the agent's repository, remade by every reset) is not watched.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import sys
import threading
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from conductor.seccomp import no_links_filter

MAX_PATHS = 4096
"""Written paths a feed keeps at most; past that it is lost (the capture tells git about 64 at most, see
``checkout.MAX_TOLD``, and makes the full pass beyond), which bounds its memory."""

_IN_MODIFY, _IN_ATTRIB, _IN_CLOSE_WRITE = 0x2, 0x4, 0x8
_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x40, 0x80, 0x100, 0x200
_IN_DELETE_SELF, _IN_MOVE_SELF, _IN_Q_OVERFLOW, _IN_IGNORED = 0x400, 0x800, 0x4000, 0x8000
_IN_ONLYDIR, _IN_DONT_FOLLOW, _IN_ISDIR = 0x01000000, 0x02000000, 0x40000000
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
_MASK = (_IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
         | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR | _IN_DONT_FOLLOW)
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name


@dataclass
class _Feed:
    key: tuple[int, int]  # the root folder's (st_dev, st_ino): a recycled folder is renamed, not copied
    wds: dict[str, int] = field(default_factory=dict)  # folder path relative to the root ("" = root) -> wd
    dirty: set[str] = field(default_factory=set)
    new_dirs: set[str] = field(default_factory=set)
    lost: bool = False
    vouched: bool = False


class _Inotify:
    """The process's one inotify instance and the feeds it serves (all under ``lock``)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._rm = libc.inotify_rm_watch
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.fd = fd
        self.lock = threading.Lock()
        self.feeds: dict[tuple[int, int], _Feed] = {}
        self.owner: dict[int, tuple[_Feed, str]] = {}  # wd -> (feed, folder path relative to its root)

    def watch(self, feed: _Feed, root: Path, rel: str) -> None:
        """Watch ``root/rel`` and every folder below it (not following links; not the root's ``.git``).

        Raises:
            OSError: a watch could not be added (ENOSPC: out of watches).
        """
        pending = [rel]
        while pending:
            rel = pending.pop()
            path = os.path.join(root, rel) if rel else os.fspath(root)
            wd = self._add(self.fd, os.fsencode(path), _MASK)
            if wd < 0:
                code = ctypes.get_errno()
                if code in (errno.ENOENT, errno.ENOTDIR):
                    continue  # gone, or a file now: its parent's event names it
                raise OSError(code, f"inotify_add_watch {path}")
            feed.wds[rel] = wd
            self.owner[wd] = (feed, rel)
            try:
                entries = list(os.scandir(path))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                if entry.is_dir(follow_symlinks=False) and not (rel == "" and entry.name == ".git"):
                    pending.append(f"{rel}/{entry.name}" if rel else entry.name)

    def unwatch(self, feed: _Feed) -> None:
        for wd in feed.wds.values():
            if self.owner.get(wd, (None,))[0] is feed:
                del self.owner[wd]
                self._rm(self.fd, wd)  # fails harmlessly for a folder already gone
        feed.wds.clear()

    def drain(self) -> None:
        """Read every queued event into the feeds' dirty sets."""
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            at = 0
            while at < len(data):
                wd, mask, _cookie, size = _EVENT.unpack_from(data, at)
                name = data[at + _EVENT.size:at + _EVENT.size + size].rstrip(b"\0")
                at += _EVENT.size + size
                self._event(wd, mask, os.fsdecode(name))

    def _event(self, wd: int, mask: int, name: str) -> None:
        if mask & _IN_Q_OVERFLOW:
            for feed in self.feeds.values():
                feed.lost = True
            return
        owner = self.owner.get(wd)
        if owner is None:
            return  # a watch already removed
        feed, rel = owner
        if mask & _IN_IGNORED:  # the folder is gone (its parent's event names it) or its watch was removed
            del self.owner[wd]
            if feed.wds.get(rel) == wd:
                del feed.wds[rel]
            if rel == "":  # the whole folder is gone
                self.unwatch(feed)
                self.feeds.pop(feed.key, None)
            return
        if mask & _IN_MOVE_SELF and rel:
            feed.lost = True  # a watched folder was renamed: its watches would report under the old name
            return
        if not name or feed.lost:
            return  # IN_DELETE_SELF, the root renamed (a recycled folder), or nothing more to learn
        if rel == "" and name == ".git":
            return  # the agent's own repository, remade by every reset; never captured
        if name == ".git":
            feed.dirty.add(rel)  # git lists the parent as a nested repository, which capture refuses
            return
        path = f"{rel}/{name}" if rel else name
        feed.dirty.add(path)
        if len(feed.dirty) > MAX_PATHS:  # the answer would be "full pass" anyway; keep memory bounded
            feed.lost = True
            feed.dirty.clear()
            feed.new_dirs.clear()
            return
        if mask & _IN_ISDIR:
            if mask & (_IN_MOVED_FROM | _IN_MOVED_TO):
                feed.lost = True
            elif mask & _IN_CREATE:
                feed.new_dirs.add(path)


_instance: _Inotify | None = None
_instance_lock = threading.Lock()


@cache
def available() -> bool:
    """Whether feeds can be used here: Linux with inotify, and sandboxed commands run without hard links."""
    return sys.platform.startswith("linux") and no_links_filter() is not None and _get() is not None


def _get() -> _Inotify | None:
    global _instance
    with _instance_lock:
        if _instance is None:
            try:
                _instance = _Inotify()
            except (OSError, AttributeError):
                return None
        return _instance


def _key(folder: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(folder)
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISDIR(info.st_mode) else None


def start(folder: Path) -> bool:
    """Start the feed of a folder that was just checked out and that nothing has run in. True if started."""
    key = _key(folder) if available() else None
    inotify = _get() if key is not None else None
    if inotify is None or key is None:
        return False
    with inotify.lock:
        inotify.drain()
        old = inotify.feeds.pop(key, None)
        if old is not None:
            inotify.unwatch(old)
        feed = _Feed(key)
        try:
            inotify.watch(feed, folder, "")
        except OSError:
            inotify.unwatch(feed)
            return False
        inotify.feeds[key] = feed
        return True


def vouch(folder: Path) -> None:
    """Tell the feed that what just ran in ``folder`` was contained (see the module docstring); a run that
    was not ends the feed instead (:func:`drop`)."""
    with _locked(folder) as (_inotify, feed):
        if feed is not None:
            feed.vouched = True


def changes(folder: Path) -> list[str] | None:
    """The paths (relative, ``/``-separated; a folder stands for everything below it) that may differ
    from the folder's stat cache, sorted; None when the feed cannot tell (no feed, not vouched for, or
    lost)."""
    with _locked(folder) as (_inotify, feed):
        if feed is None or not feed.vouched or feed.lost:
            return None
        return sorted(feed.dirty)


def rearm(folder: Path) -> bool:
    """After ``folder`` was made to match its stat cache again (a reset): carry its feed on if it was
    vouched for since it was armed, and forget what was written before. A feed that was not vouched for
    ends. True if the folder has a feed now."""
    with _locked(folder) as (inotify, feed):
        if inotify is None or feed is None:
            return False
        if not feed.vouched:
            inotify.unwatch(feed)
            inotify.feeds.pop(feed.key, None)
            return False
        try:
            if feed.lost:
                inotify.unwatch(feed)
                inotify.watch(feed, folder, "")
            else:
                for rel in sorted(feed.new_dirs):
                    if rel not in feed.wds and os.path.isdir(os.path.join(folder, rel)):
                        inotify.watch(feed, folder, rel)
        except OSError:
            inotify.unwatch(feed)
            inotify.feeds.pop(feed.key, None)
            return False
        feed.dirty.clear()
        feed.new_dirs.clear()
        feed.lost = feed.vouched = False
        return True


def drop(folder: Path) -> None:
    """End the feed of ``folder`` (removed, or written by something not contained)."""
    with _locked(folder) as (inotify, feed):
        if inotify is not None and feed is not None:
            inotify.unwatch(feed)
            inotify.feeds.pop(feed.key, None)


class _locked:
    """``with _locked(folder) as (inotify, feed)``: the instance locked and drained, and the folder's feed."""

    def __init__(self, folder: Path) -> None:
        self.key = _key(folder)
        self.inotify = _instance

    def __enter__(self) -> tuple[_Inotify | None, _Feed | None]:
        if self.inotify is None:
            return None, None
        self.inotify.lock.acquire()
        self.inotify.drain()
        return self.inotify, self.inotify.feeds.get(self.key) if self.key is not None else None

    def __exit__(self, *exc: object) -> None:
        if self.inotify is not None:
            self.inotify.lock.release()
