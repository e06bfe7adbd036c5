"""The pod plan, pure: what one pod of a completion index is (hostname, env, argv, user and
groups from the securityContext) and its root filesystem as a list of steps: the OS under the
image, the image's files as docker/Dockerfile lays them out, the kubelet's /etc files, the volumes."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .image import Host, ImageConfig
from .kubelet import container_argv, quantity, resolve_env
from .manifests import ManifestError, Manifests, PodFacts

# containerd/CRI-O give every container a 64 MB /dev/shm unless a volume is mounted there.
DEFAULT_SHM = "size=64m,mode=1777"
# The kernel's random UUID per boot: what tells two hosts apart for the run directory's lock.
BOOT_ID = "/proc/sys/kernel/random/boot_id"


# A pod's root filesystem is built by running these steps in order on an empty tmpfs.
@dataclass(frozen=True)
class Mount:
    target: str
    """Path in the pod."""
    source: str = ""
    """Host path: of a bind mount, or the read-only lower layer of an overlay."""
    fstype: str = "bind"
    """bind | overlay (image content: the pod's writes and mount points go to an upper layer of its
    own, as in a container's root filesystem, never to the host) | tmpfs | proc | sysfs"""
    read_only: bool = False
    options: str = ""
    """tmpfs options (size, mode)."""


@dataclass(frozen=True)
class Dir:
    target: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Link:
    target: str
    points_to: str


Step = Mount | Dir | Link


def step_from_dict(data: dict) -> Step:
    kind = {"Mount": Mount, "Dir": Dir, "Link": Link}[data.pop("kind")]
    return kind(**data)


@dataclass(frozen=True)
class PodPlan:
    """Everything `enter` needs to become one pod."""

    name: str
    hostname: str
    argv: list[str]
    env: dict[str, str]
    workdir: str
    uid: int
    gid: int
    groups: list[int]
    no_new_privs: bool
    read_only_root: bool
    root: str
    """Host directory the pod's root tmpfs is mounted on (inside the pod's mount namespace only)."""
    layers: str
    """Host directory for the upper layers of the overlays (a tmpfs, likewise)."""
    steps: list[Step] = field(default_factory=list)

    def to_json(self) -> str:
        data = asdict(self)
        data["steps"] = [{"kind": type(step).__name__, **asdict(step)} for step in self.steps]
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> PodPlan:
        data = json.loads(text)
        data["steps"] = [step_from_dict(step) for step in data["steps"]]
        return cls(**data)


@dataclass(frozen=True)
class HostDirs:
    """Host directories behind a pod's volumes and kubelet files."""

    shared: Path
    """configmaps/<volume>/ (one file per key) and pvc/<claim>/: the same for every pod, as a
    ReadWriteMany claim is."""
    pod: Path
    """This pod's own: root/ and layers/ (mount points of its root tmpfs and of its overlays' upper
    layers), emptydirs/<volume>/, etc/ (hosts, hostname, resolv.conf, passwd, group), boot_id (the
    kernel boot id of the pod's node, bind-mounted over BOOT_ID)."""


def plan_pod(
    manifests: Manifests, image: ImageConfig, host: Host, pod: PodFacts, index: int, dirs: HostDirs
) -> PodPlan:
    """One pod of `index`, as the kubelet would start its container from this image."""
    container = manifests.container()
    env = resolve_env(_with_completion_index(container), pod, manifests.config_maps)
    argv = container_argv(container, image, env)
    security = {**manifests.pod_spec.get("securityContext", {}), **container.get("securityContext", {})}
    uid = security.get("runAsUser", image.uid)
    # Without runAsGroup the runtime takes the user's primary group from the image's /etc/passwd (0 if absent).
    gid = security.get("runAsGroup", image.gid if uid == image.uid else 0)
    if security.get("runAsNonRoot") and uid == 0:
        raise ManifestError("runAsNonRoot is set but the container would run as root: the kubelet refuses to start it")
    groups = [*security.get("supplementalGroups", []), *([security["fsGroup"]] if "fsGroup" in security else [])]
    return PodPlan(
        name=pod.name,
        hostname=manifests.hostname(index),
        argv=argv,
        # The runtime starts from the image's ENV; the manifest's env wins; HOSTNAME is the pod's.
        env={**image.env, "HOSTNAME": manifests.hostname(index), **env},
        workdir=container.get("workingDir", image.workdir),
        uid=uid,
        gid=gid,
        groups=groups,
        no_new_privs=security.get("allowPrivilegeEscalation") is False,
        read_only_root=bool(security.get("readOnlyRootFilesystem")),
        root=str(dirs.pod / "root"),
        layers=str(dirs.pod / "layers"),
        steps=[
            *system_steps(),
            # Each pod runs as on a node of its own: the kernel's boot id is the pod's (its dirs.pod
            # file), so a replacement pod and the pod it replaces read as two hosts (RunDirLock).
            Mount(BOOT_ID, str(dirs.pod / "boot_id"), read_only=True),
            *image_steps(image, host),
            *kubelet_steps(dirs.pod / "etc"),
            *volume_steps(manifests, container, dirs),
            # Last, so that a volume (an emptyDir on /tmp) cannot hide it when the checkout
            # lives under a volume's mount path (a clone in /tmp).
            *venv_origin_steps(host),
        ],
    )


def _with_completion_index(container: dict) -> dict:
    """The Job controller appends JOB_COMPLETION_INDEX (from the pod's annotation) to the env unless
    the container defines it: being last, it is seen by command/args but not by other env values."""
    env = container.get("env", [])
    if any(var["name"] == "JOB_COMPLETION_INDEX" for var in env):
        return container
    index_ref = {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    return {**container, "env": [*env, {"name": "JOB_COMPLETION_INDEX", "valueFrom": index_ref}]}


def system_steps() -> list[Step]:
    """The OS under the image: the host's /usr and /etc (python3 and tini stand in for Debian's),
    a fresh /proc for the pod's PID namespace, a container-sized /dev."""
    steps: list[Step] = []
    for name in ("usr", "etc", "bin", "sbin", "lib", "lib64"):
        path = Path("/") / name
        if path.is_symlink():
            steps.append(Link(str(path), os.readlink(path)))
        elif path.is_dir():
            steps.append(Mount(str(path), str(path), fstype="overlay"))
    steps += [
        Mount("/proc", fstype="proc"),
        Mount("/sys", fstype="sysfs", read_only=True),
        Mount("/dev", fstype="tmpfs", options="mode=755"),
        *(Mount(f"/dev/{dev}", f"/dev/{dev}") for dev in ("null", "zero", "full", "random", "urandom", "tty")),
        *(Link(f"/dev/{name}", f"/proc/self/fd{suffix}") for name, suffix in
          (("fd", ""), ("stdin", "/0"), ("stdout", "/1"), ("stderr", "/2"))),
        Mount("/dev/shm", fstype="tmpfs", options=DEFAULT_SHM),
    ]  # fmt: skip
    return steps


def image_steps(image: ImageConfig, host: Host) -> list[Step]:
    """The image's own files, laid out as docker/Dockerfile's final stage does (a test compares)."""
    return [
        Dir("/tmp", 0o1777),
        Dir("/app"),
        Mount("/app/job", str(host.checkout / "job"), fstype="overlay"),
        Mount("/app/data", str(host.data), fstype="overlay"),
        Dir("/app/runs", 0o755, image.uid, image.gid),
        Mount("/opt/venv", str(host.venv), fstype="overlay"),
    ]


def venv_origin_steps(host: Host) -> list[Step]:
    """This venv was made at its host path: its scripts start `#!<host path>/bin/python` and its
    python links to the interpreter it was made from. Both must resolve in the pod (a system
    Python is already there, in /usr)."""
    venv, python_home = str(host.venv), host.python_home()
    steps: list[Step] = [Mount(venv, venv, fstype="overlay")]
    if not python_home.is_relative_to("/usr"):
        steps.append(Mount(str(python_home), str(python_home), fstype="overlay"))
    return steps


def kubelet_steps(files: Path) -> list[Step]:
    """/etc/hosts, hostname and resolv.conf as the kubelet mounts them; passwd and group with the
    image's user (docker/Dockerfile's useradd)."""
    return [Mount(f"/etc/{name}", str(files / name), read_only=True)
            for name in ("hosts", "hostname", "resolv.conf", "passwd", "group")]  # fmt: skip


def volume_steps(manifests: Manifests, container: dict, dirs: HostDirs) -> list[Step]:
    by_name = {volume["name"]: volume for volume in manifests.pod_spec.get("volumes", [])}
    steps: list[Step] = []
    for mount in container.get("volumeMounts", []):
        volume = by_name[mount["name"]]
        read_only = bool(mount.get("readOnly"))
        if "configMap" in volume:
            source, read_only = dirs.shared / "configmaps" / mount["name"], True  # the kubelet mounts these read-only
        elif "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            if claim not in manifests.claims:
                raise ManifestError(f"volume {mount['name']}: PVC {claim!r} is not in the rendered manifests")
            source = dirs.shared / "pvc" / claim
        elif "emptyDir" in volume and volume["emptyDir"].get("medium") == "Memory":
            size = volume["emptyDir"].get("sizeLimit")
            options = "mode=1777" + (f",size={int(quantity(size))}" if size else "")
            steps.append(Mount(mount["mountPath"], fstype="tmpfs", read_only=read_only, options=options))
            continue
        elif "emptyDir" in volume:
            source = dirs.pod / "emptydirs" / mount["name"]
        else:
            raise ManifestError(f"volume {mount['name']}: {sorted(set(volume) - {'name'})} is not supported here")
        steps.append(Mount(mount["mountPath"], str(source / mount.get("subPath", "")).rstrip("/"), read_only=read_only))
    return steps
