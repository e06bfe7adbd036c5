"""What a run opens to the network: a run whose processes are all on this host listens on
loopback only (README: What listens where).

The launch is the one `make train-local` runs, on generated digits; the test reads the listening
sockets of the launcher and its workers while they train.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from helpers import REPO, clean_env, kill_tree, tiny_overrides


def listening_sockets(root: psutil.Process) -> list[tuple[str, int, str, int]]:
    """(process name, pid, address, port) of every listening TCP socket of `root` and its children."""
    found = []
    for process in (root, *root.children(recursive=True)):
        for conn in process.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                found.append((process.name(), process.pid, conn.laddr.ip, conn.laddr.port))
    return found


@pytest.mark.processes
@pytest.mark.parametrize(
    "share_store",
    [
        pytest.param("1", id="make-train-local"),  # the workers' store hosted by rank 0
        pytest.param("0", id="shared-agent-store"),  # torch's default: the agent hosts it too
    ],
)
def test_a_local_run_listens_on_loopback_only(tmp_path: Path, tiny_root: Path, share_store: str) -> None:
    overrides = tiny_overrides(tiny_root, tmp_path / "run", "train.epochs=1", "train.log_interval=1")
    launch = [sys.executable, "-m", "job.launch", "--standalone", "--nproc-per-node", "2"]  # as make train-local
    cmd = [*launch, "-m", "job", "train", *overrides]
    env = clean_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE=share_store, OMP_NUM_THREADS="1")
    launcher = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output = []
        for line in launcher.stdout:  # the first logged step: every rank has joined the group
            output.append(line)
            if "Train Epoch" in line:
                break
        else:
            pytest.fail("the run ended before training:\n" + "".join(output))
        sockets = listening_sockets(psutil.Process(launcher.pid))
        output.append(launcher.communicate(timeout=300)[0])
    finally:
        if launcher.poll() is None:
            kill_tree(launcher.pid)
    assert launcher.returncode == 0, "".join(output)
    assert any(name == "pt_elastic" for name, *_ in sockets), sockets  # the rendezvous store was seen
    exposed = [s for s in sockets if not ipaddress.ip_address(s[2]).is_loopback]
    assert not exposed, f"listening beyond loopback: {exposed}; all: {sockets}"
