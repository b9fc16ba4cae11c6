"""The seccomp filter every sandboxed command runs under: it may not make hard links.

Why: the change feed (:mod:`conductor.workspace.feed`) learns what a command wrote from inotify events on
the folders of its workspace, and inotify reports a write to the folder *through which the file was
opened*. A second name for a file (``ln a b``) would let a command rewrite ``a`` by writing ``b`` and
then remove ``b``, with no event naming ``a``. Without ``link``/``linkat`` every file has one name; a name
in another mount is impossible anyway (``EXDEV``). ``open_by_handle_at``, which opens a file without any
path, is refused for the same reason (it also needs ``CAP_DAC_READ_SEARCH``).

The refusal is ``EXDEV``, the error of a link across file systems, which tools that hard-link when they
can (``git`` writing objects, ``git clone`` of a local repository, ``cp -l`` fallbacks, package managers)
already handle by copying. ``open_by_handle_at`` gets ``EPERM``.

Format: a classic BPF program (an array of ``struct sock_filter``: u16 code, u8 jt, u8 jf, u32 k, in the
host's byte order) over ``struct seccomp_data`` (``nr`` at offset 0, ``arch`` at 4), as seccomp(2) and
``bwrap --seccomp FD`` read it. Syscall numbers are the kernel's tables (``arch/*/entry/syscalls``,
``include/uapi/asm-generic/unistd.h``) for the host's architecture and its 32-bit compat mode; a syscall
from an architecture outside those gets ``ENOSYS``.
"""

from __future__ import annotations

import errno
import platform
import struct
from functools import cache

_LD_W_ABS, _JEQ_K, _AND_K, _RET_K = 0x20, 0x15, 0x54, 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_X32_BIT = 0x40000000

# audit arch -> (link, linkat, open_by_handle_at); None where the arch has no such call.
_ARCHES: dict[int, tuple[int | None, int, int]] = {
    0xC000003E: (86, 265, 304),  # x86_64 (and x32, masked)
    0x40000003: (9, 303, 342),  # i386
    0xC00000B7: (None, 37, 265),  # aarch64 (asm-generic)
    0x40000028: (9, 330, 371),  # arm EABI
}
_HOSTS = {"x86_64": (0xC000003E, 0x40000003), "amd64": (0xC000003E, 0x40000003),
          "aarch64": (0xC00000B7, 0x40000028), "arm64": (0xC00000B7, 0x40000028)}


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


@cache
def no_links_filter() -> bytes | None:
    """The filter program for this host (bytes, 8 per instruction), or None when the host's architecture
    is not one this module knows (x86_64, aarch64): commands then run without it, and the change feed is
    not used (:func:`conductor.workspace.feed.available`)."""
    arches = _HOSTS.get(platform.machine().lower())
    if arches is None:
        return None
    sections = []
    for arch in arches:
        link, linkat, by_handle = _ARCHES[arch]
        body = [_insn(_LD_W_ABS, 0)]
        if arch == 0xC000003E:
            body.append(_insn(_AND_K, 0xFFFFFFFF & ~_X32_BIT))
        checks = [(n, errno.EXDEV) for n in (link, linkat) if n is not None] + [(by_handle, errno.EPERM)]
        # Each check jumps over the remaining checks and the ALLOW to its own RET.
        for number, _err in checks:
            body.append(_insn(_JEQ_K, number, jt=len(checks), jf=0))
        body.append(_insn(_RET_K, _RET_ALLOW))
        body += [_insn(_RET_K, _RET_ERRNO | err) for _n, err in checks]
        sections.append((arch, body))
    # Dispatch on the arch: one JEQ per known arch, then ENOSYS for any other.
    program = [_insn(_LD_W_ABS, 4)]
    offsets, at = [], 0
    for _arch, body in sections:
        offsets.append(at)
        at += len(body)
    dispatch = len(sections) + 1  # the JEQs and the ENOSYS RET that follows them
    for i, (arch, _body) in enumerate(sections):
        # From JEQ number i, the next instruction is i + 1; its section starts at dispatch + offsets[i].
        program.append(_insn(_JEQ_K, arch, jt=dispatch + offsets[i] - (i + 1), jf=0))
    program.append(_insn(_RET_K, _RET_ERRNO | errno.ENOSYS))
    for _arch, body in sections:
        program += body
    return b"".join(program)
