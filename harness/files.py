"""Reading files the harness does not control (specs, checkpoints, whatever a worker wrote) as
the untrusted input they are: only ordinary regular files of data, never blocking, bounded.

procfs, sysfs and their kin report their entries as regular files, mostly of size 0, yet a read
yields data, waits (``/proc/kmsg``) or consumes something (as root, reading ``/proc/kmsg`` takes
those kernel messages away from everyone else). So a file is refused by the filesystem it lives
on before any byte is read (``statfs`` on the path, then ``fstatfs`` on the open descriptor,
which a rename in between cannot fool), and a read that yields more than the file's size says
is refused too.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import sys
from pathlib import Path
from typing import BinaryIO

#: filesystems whose entries are kernel interfaces, not files of data: f_type -> name
#: (linux/magic.h). devtmpfs shares tmpfs' magic, but holds only device nodes, which are
#: refused as not regular anyway; tmpfs itself (/dev/shm, a tmpfs /tmp) holds real files.
PSEUDO_FILESYSTEMS = {
    0x9FA0: "procfs", 0x62656572: "sysfs", 0x64626720: "debugfs", 0x74726163: "tracefs",
    0x73636673: "securityfs", 0x27E0EB: "cgroup", 0x63677270: "cgroup2",
    0x62656570: "configfs", 0xCAFE4A11: "bpf", 0x6165676C: "pstore", 0xDE5E81E4: "efivarfs",
    0x1CD1: "devpts", 0xF97CFF8C: "selinuxfs", 0x43415D53: "smackfs",
    0x65735543: "fusectl", 0x42494E4D: "binfmt_misc", 0x6E736673: "nsfs",
    0x19800202: "mqueue", 0x958458F6: "hugetlbfs", 0x50495045: "pipefs",
    0x534F434B: "sockfs", 0x09041934: "anon_inode",
}


class NotAFileOfData(OSError):
    """A path that is not an ordinary regular file of data; ``str()`` says what it is."""

    def __init__(self, path, what: str):
        super().__init__(errno.EINVAL, what, str(path))
        self.what = what

    def __str__(self) -> str:
        return self.what


_libc = None


def _statfs_type(target) -> int | None:
    """The filesystem type (``f_type``) of a path or an open descriptor; None where the
    platform cannot say (not Linux, no libc)."""
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(512)  # struct statfs is 120 bytes on 64-bit Linux
        if isinstance(target, int):
            rc = _libc.fstatfs(target, buf)
        else:
            rc = _libc.statfs(os.fsencode(target), buf)
    except (OSError, AttributeError, TypeError, ValueError):
        return None
    if rc != 0:
        return None
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF  # f_type: the first word


def pseudo_filesystem(target) -> str | None:
    """The name of the pseudo-filesystem a path or open descriptor lives on (``procfs``,
    ``sysfs``, ...), or None for an ordinary one."""
    kind = _statfs_type(target)
    return None if kind is None else PSEUDO_FILESYSTEMS.get(kind)


def kind_of(mode: int) -> str:
    """What a file of this ``st_mode`` is, in words (``a FIFO``, ``a character device``, ...)."""
    for test, what in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return what
    return "not a regular file"


def _pseudo(path, name: str) -> NotAFileOfData:
    return NotAFileOfData(path, f"on {name}, a pseudo-filesystem of kernel interfaces, not a "
                                "file of data (refused before reading any byte)")


def open_regular(path, follow: bool = False) -> BinaryIO:
    """``path`` opened for reading only if it is a regular file on an ordinary filesystem:
    never blocking (a FIFO, or /proc/kmsg, whose reads wait), never a directory, device or a
    kernel interface of procfs/sysfs, and unless ``follow``, never through a symbolic link (a
    worker's file linked to some other file is not its output). OSError otherwise
    (``NotAFileOfData`` saying what it is, where the file exists)."""
    name = pseudo_filesystem(path)  # before opening: opening some of these does something
    if name:
        raise _pseudo(path, name)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
    if not follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotAFileOfData(path, f"{kind_of(mode)}, not a regular file")
        name = pseudo_filesystem(fd)  # the file really opened (a rename may have come between)
        if name:
            raise _pseudo(path, name)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(fh: BinaryIO, limit: int) -> bytes:
    """The whole content of a file ``open_regular`` opened, if it holds at most ``limit``
    bytes; a file that yields more than its size says (a "regular" file of size 0 that
    yields data) is no ordinary file and is refused, as is one over the limit."""
    size = os.fstat(fh.fileno()).st_size
    if size > limit:
        raise NotAFileOfData(fh.name, f"{size:,} bytes, more than the {limit:,} allowed")
    data = fh.read(size + 1)
    if data is None:  # would wait: only a kernel interface does that
        raise NotAFileOfData(fh.name, "cannot be read without waiting: not a file of data")
    if len(data) > size:
        raise NotAFileOfData(fh.name, f"yields more bytes than its size ({size:,}) says: "
                                      "not an ordinary file of data")
    return data


def input_file_problem(path) -> str | None:
    """Why a user's input file (a spec, ``--weights``) cannot be read as data, in words, found
    without reading a byte of it; None when it can be."""
    try:
        with open_regular(path, follow=True):
            return None
    except FileNotFoundError:
        return "no such file"
    except NotAFileOfData as exc:
        return exc.what
    except OSError as exc:
        try:  # a socket cannot even be opened (ENXIO): say what it is all the same
            mode = os.stat(path).st_mode
        except OSError:
            mode = None
        if mode is not None and not stat.S_ISREG(mode):
            return f"{kind_of(mode)}, not a regular file"
        return f"cannot be opened ({exc.strerror or exc})"


def tail(path: Path, lines: int = 15, max_bytes: int = 16 * 1024) -> str:
    """The last lines of a log, reading at most its last ``max_bytes`` (a log may be huge)."""
    try:
        with open_regular(path) as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read(max_bytes) or b""  # None: nothing without waiting
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace").splitlines()
    if size > max_bytes and text:
        text = text[1:]  # the first line is cut
    return "\n".join(line[:500] for line in text[-lines:])
