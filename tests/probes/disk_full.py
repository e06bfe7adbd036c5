"""`python disk_full.py N ARGS...` runs `python -m job ARGS...` with the N-th checkpoint write
failing as on a full disk: ENOSPC while the temporary file is synced, after its bytes went out.
The real atomic-write code runs; only the system call's answer is changed."""

import errno
import os
import sys

from job.__main__ import main

fail_at = int(sys.argv[1])
checkpoint_writes = 0
real_fsync = os.fsync


def fsync(fd: int) -> None:
    global checkpoint_writes
    if "/checkpoints/.step-" in os.readlink(f"/proc/self/fd/{fd}"):
        checkpoint_writes += 1
        if checkpoint_writes == fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real_fsync(fd)


os.fsync = fsync
sys.exit(main(sys.argv[2:]))
