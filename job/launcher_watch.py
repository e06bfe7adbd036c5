"""A worker never outlives its launcher: once the launcher is gone, the worker stops as if preempted.

torch's elastic agent (torchrun, `python -m job.launch`, `accelerate launch`) starts every worker
in a session of its own (start_new_session=True in
torch/distributed/elastic/multiprocessing/subprocess_handler), so when the launcher dies without
stopping them (SIGKILL of its process group, the OOM killer, a crash) nothing else ever does:
they trained on with parent pid 1 and held the run directory's lock against the rerun. Here the
worker sends itself the SIGTERM the launcher would have passed on, and job/preemption.py does
the rest (a checkpoint and exit 75 while training; before training, SIGTERM ends it at once).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

CHECK_EVERY_S = 1.0
"""How often a worker checks that its launcher is still its parent: a stop about a second after
the launcher's death, for one getppid() call a second."""


def stop_when_the_launcher_dies(environ: Mapping[str, str] = os.environ) -> threading.Thread | None:
    """Under an elastic agent (TORCHELASTIC_RUN_ID is set), watch the parent process and send this
    process SIGTERM once it is gone. Returns the watching (daemon) thread; None when no agent
    launched this process (a plain `python -m job`, whose parent is a shell or a supervisor that
    stops it itself).

    A thread comparing os.getppid() with the parent at start, rather than prctl(PR_SET_PDEATHSIG):
    that signal fires when the parent *thread* that started the worker ends, which would tie a
    worker's life to how a torch version spawns, and it exists on Linux only.
    """
    if "TORCHELASTIC_RUN_ID" not in environ:
        return None
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(CHECK_EVERY_S)
        log.warning(f"the launcher (pid {launcher}) is gone: stopping as if preempted (SIGTERM)")
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()
    return thread
