"""What kind of file the job opens: it reads regular files only, and never writes through a
symbolic link in the run directory.

Reading: a path given as a config, a checkpoint, a data file, an image or a model may name a
FIFO, a device, a socket or a directory. `open()` on a FIFO blocks until a writer appears, and
`Path.is_file()` is False for it, so "does not exist" was the answer. Every read goes through
open_regular: the file is opened without blocking (O_NONBLOCK), the *opened* file is checked
(fstat, so a path swapped between a check and the open cannot slip through), and anything
but a regular file is one line naming what it is.

Writing: a symbolic link planted in the run directory (`.lock` -> a file elsewhere) made the
job create and write the link's target. Files written in place there are opened with
O_NOFOLLOW (open_no_follow), and the run directory's entries are checked before anything is
written (refuse_symlinks). Files replaced atomically (job/safe_io.py) are safe already: the
rename replaces a link, it never writes through one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import BinaryIO

from job.errors import BadInputError, JobError, RunFailedError

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def kind_of(mode: int) -> str:
    """What a stat mode is, in words ("a FIFO (named pipe)"); "a special file" for anything else."""
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def not_a_regular_file(path: str | Path) -> str | None:
    """Why `path` cannot be read as a file ("does not exist", "is a FIFO (named pipe), not a
    regular file"), or None for a regular file (symbolic links followed). Never opens it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    return None if stat.S_ISREG(mode) else f"is {kind_of(mode)}, not a regular file"


def open_regular(path: str | Path, what: str, fix: str, error: type[Exception] = BadInputError) -> BinaryIO:
    """`path` open for reading in binary, checked to be a regular file once open. Raises `error`
    with "{what} {path} {why}; {fix}" when it is missing, unreadable or not a regular file (a FIFO,
    a device, a socket, a directory); never blocks on a FIFO."""
    name = f"{what} {path}" if what else str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise error(f"{name} does not exist; {fix}") from None
    except OSError as e:
        why = "is a directory, not a regular file" if e.errno == errno.EISDIR else f"cannot be read ({e.strerror})"
        raise error(f"{name} {why}; {fix}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{name} is {kind_of(mode)}, not a regular file; {fix}")
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return os.fdopen(fd, "rb")


def read_regular(path: str | Path, what: str, fix: str, error: type[Exception] = BadInputError) -> bytes:
    """The bytes of a regular file; `error` as open_regular, or when the read fails."""
    with open_regular(path, what, fix, error) as f:
        try:
            return f.read()
        except OSError as e:
            raise error(f"{what + ' ' if what else ''}{path} cannot be read ({e.strerror}); {fix}") from None


def open_no_follow(path: str | Path, flags: int, mode: int = 0o666) -> int:
    """os.open that refuses a symbolic link as the last part of `path` (O_NOFOLLOW): BadInputError
    naming it. Other OSErrors are raised as they are, for the caller's own message."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP and os.path.islink(path):
            raise BadInputError(_symlink_message(Path(path))) from None
        raise


def refuse_symlinks(paths: list[Path]) -> None:
    """BadInputError naming the first of `paths` that is a symbolic link (a file or a directory the
    job would write into); checked before anything is written."""
    for path in paths:
        if path.is_symlink():
            raise BadInputError(_symlink_message(path))


def _symlink_message(path: Path) -> str:
    return (
        f"{path} is a symbolic link (to {os.readlink(path)}); the job writes nothing through a link in its run "
        "directory: remove the link, or use another run.name"
    )


def write_fix(e: OSError) -> str:
    """What to do about a failed write, for its errno: free space for a full disk, a writable
    file system for a read-only one, permissions for a refusal."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space there"
    if e.errno == errno.EROFS:
        return "the file system is read-only: mount it read-write (or point the path elsewhere)"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "make it writable for this user"
    return "check that file system"


def write_error_kind(e: OSError) -> type[JobError]:
    """A full disk (or quota) is a run-time condition a later retry may get past (exit 1); any
    other refusal to write (read-only, permissions) stays until someone fixes it (exit 2)."""
    return RunFailedError if e.errno in (errno.ENOSPC, errno.EDQUOT) else BadInputError
