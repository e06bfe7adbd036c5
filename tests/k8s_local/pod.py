"""The pod (root): `python -m k8s_local.pod enter PLAN.json`, started by the Job controller inside
the pod's fresh network, mount, UTS and PID namespaces, builds the plan's root filesystem, chroots,
drops to the pod's user and execs the container command."""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import sys
from pathlib import Path

from .plan import Dir, Link, PodPlan


def enter(plan: PodPlan) -> None:
    """Become the pod (we are PID 1 of fresh PID, mount and UTS namespaces, inside the pod's network
    namespace): build its root filesystem, chroot, drop to its user, exec the container command."""
    socket.sethostname(plan.hostname)
    root = plan.root
    _mount("-t", "tmpfs", "-o", "mode=755", "tmpfs", root)
    _mount("-t", "tmpfs", "tmpfs", plan.layers)
    layers = []
    for step in plan.steps:
        target = root + step.target
        if isinstance(step, Link):
            os.symlink(step.points_to, target)
        elif isinstance(step, Dir):
            os.makedirs(target, exist_ok=True)
            os.chmod(target, step.mode)
            os.chown(target, step.uid, step.gid)
        elif step.fstype == "bind":
            _mount_point(target, is_dir=os.path.isdir(step.source))
            _mount("--bind", *(("-o", "ro") if step.read_only else ()), step.source, target)
        elif step.fstype == "overlay":
            upper, work = (f"{plan.layers}/{len(layers)}/{name}" for name in ("upper", "work"))
            os.makedirs(upper)
            os.makedirs(work)
            _mount_point(target, is_dir=True)
            _mount("-t", "overlay", "-o", f"lowerdir={step.source},upperdir={upper},workdir={work}", "overlay", target)
            layers.append(target)
        else:
            _mount_point(target, is_dir=True)
            options = ",".join(o for o in (step.options, "ro" if step.read_only else "") if o)
            _mount("-t", step.fstype, *(("-o", options) if options else ()), step.fstype, target)
    if plan.read_only_root:  # the image's content, not the volumes
        for target in [root, *layers]:
            _mount("-o", "remount,ro", target)
    os.chroot(root)
    os.chdir(plan.workdir)
    os.setgroups(plan.groups)
    os.setgid(plan.gid)
    os.setuid(plan.uid)
    if plan.no_new_privs and ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    try:
        os.execvpe(plan.argv[0], plan.argv, plan.env)
    except OSError as error:  # what the runtime reports as a failed container start
        print(f"error: cannot start the container: exec {plan.argv[0]}: {error.strerror}", file=sys.stderr)
        sys.exit(128)


def _mount_point(path: str, is_dir: bool) -> None:
    """Create a missing mount point as the container runtime does (a directory, or a file for a file)."""
    if os.path.lexists(path):
        return
    os.makedirs(path if is_dir else os.path.dirname(path), exist_ok=True)
    if not is_dir:
        open(path, "a").close()


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["enter"] and len(sys.argv) == 3:
        enter(PodPlan.from_json(Path(sys.argv[2]).read_text()))
    else:
        sys.exit("usage: python -m k8s_local.pod enter PLAN.json  (run by LocalJob inside a pod's namespaces)")
