"""Run a rendered Kubernetes Job on this machine the way a cluster would: one process tree per pod.

    manifests = Manifests.parse(subprocess.check_output(["kubectl", "kustomize", "k8s/base"], text=True))
    with LocalJob(manifests, Host.of(REPO, data=tiny_mnist), work=tmp_path) as job:
        job.start()
        job.wait(timeout=300)

Four stages, each its own section below:
1. kubelet rules (pure): `$(VAR)` expansion, env from value/fieldRef/resourceFieldRef/
   configMapKeyRef, command vs ENTRYPOINT;
2. the pod plan (pure): what one pod of a completion index is: hostname, env, argv, user, and
   its root filesystem as a list of steps (the image's files from docker/Dockerfile, the
   kubelet's /etc files, the volumes), user and groups from the securityContext;
3. the pod (root, run as `python k8s_local.py enter PLAN` inside the pod's namespaces): builds
   the root filesystem, chroots, drops to the pod's user, execs the container command;
4. the network and the Job controller: a bridge namespace with a veth to each pod's network
   namespace; pods started per index, failed ones replaced as the Job controller does.

Not emulated: the image itself (its files come from this checkout and .venv, its OS from this
machine's /usr and /etc; `make image-test` runs the real image), the API server, the scheduler,
resource limits, probes, seccomp, NetworkPolicy, Secrets. Cluster DNS is a hosts file per pod
listing exactly the names cluster DNS would answer from that pod, updated as pods come and go.

Needs root, iproute2 (`ip`), util-linux (`unshare`, `mount`) and the image's ENTRYPOINT (tini).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import random
import re
import shlex
import signal
import socket
import string
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

# Every namespace this module creates is named PREFIX<pid of the creating process>-...: leftovers
# of a crashed run are recognised by a dead pid, without touching a concurrent run's.
PREFIX = "k8sl"
CLUSTER_DOMAIN = "cluster.local"
SUBNET = "10.244.0"  # inside the bridge's own namespace: never routed on the host
NODE_NAME = "k8s-local"
# The Job controller delays a failed index's next pod by 10 s, doubling per failure, up to 6 min.
BACKOFF_BASE_S, BACKOFF_MAX_S = 10, 360
# debian:bookworm-slim's PATH, the base the image's `ENV PATH=/opt/venv/bin:$PATH` extends.
BASE_IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# containerd/CRI-O give every container a 64 MB /dev/shm unless a volume is mounted there.
DEFAULT_SHM = "size=64m,mode=1777"


class ManifestError(ValueError):
    """A manifest this runner cannot run as a cluster would (unsupported kind of value or volume)."""


# --- 1. kubelet rules -------------------------------------------------------------------------


def expand(text: str, variables: dict[str, str]) -> str:
    """The kubelet's `$(VAR)` expansion of env values, command and args: a defined VAR is replaced,
    an undefined one is left as written, `$$` is a literal `$`, any other `$` stays as it is
    (k8s.io/kubernetes third_party/forked/golang/expansion)."""
    out, i = [], 0
    while i < len(text):
        if text[i] != "$" or i + 1 == len(text):
            out.append(text[i])
            i += 1
        elif text[i + 1] == "$":
            out.append("$")
            i += 2
        elif text[i + 1] == "(" and (end := text.find(")", i + 2)) != -1:
            name = text[i + 2 : end]
            out.append(variables.get(name, f"$({name})"))
            i = end + 1
        else:
            out.append(text[i : i + 2])
            i += 2
    return "".join(out)


@dataclass(frozen=True)
class PodFacts:
    """What the API server and kubelet know about one pod, the sources of its downward-API values."""

    name: str
    namespace: str
    uid: str
    labels: dict[str, str]
    annotations: dict[str, str]
    pod_ip: str
    host_ip: str
    node_name: str = NODE_NAME
    service_account: str = "default"


def field_ref(path: str, pod: PodFacts) -> str:
    """A downward-API fieldRef value."""
    if match := re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path):
        return (pod.labels if match[1] == "labels" else pod.annotations).get(match[2], "")
    simple = {
        "metadata.name": pod.name,
        "metadata.namespace": pod.namespace,
        "metadata.uid": pod.uid,
        "spec.nodeName": pod.node_name,
        "spec.serviceAccountName": pod.service_account,
        "status.podIP": pod.pod_ip,
        "status.podIPs": pod.pod_ip,
        "status.hostIP": pod.host_ip,
        "status.hostIPs": pod.host_ip,
    }
    if path not in simple:
        raise ManifestError(f"fieldRef {path!r} is not a downward-API field")
    return simple[path]


def resolve_env(container: dict, pod: PodFacts, config_maps: dict[str, dict]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom first, then `env` in order,
    each `value` expanded with the variables defined before it (later entries win)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" not in source:
            raise ManifestError(f"envFrom {source} is not supported here (only configMapRef)")
        data = _config_map(config_maps, source["configMapRef"])
        env.update({source.get("prefix", "") + key: value for key, value in data.items()})
    for var in container.get("env", []):
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(str(var.get("value", "")), env)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            env[name] = field_ref(source["fieldRef"]["fieldPath"], pod)
        elif "resourceFieldRef" in source:
            env[name] = resource_field_ref(source["resourceFieldRef"], container)
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            data = _config_map(config_maps, ref)
            if ref["key"] in data:
                env[name] = data[ref["key"]]
            elif not ref.get("optional"):
                raise ManifestError(f"env {name}: ConfigMap {ref['name']} has no key {ref['key']!r}")
        else:
            raise ManifestError(f"env {name}: valueFrom {sorted(source)} is not supported here")
    return env


def resource_field_ref(ref: dict, container: dict) -> str:
    """A downward-API resource value: the container's limit or request in units of `divisor`, rounded
    up; an unset limit reads as the node's allocatable CPUs or memory."""
    if ref.get("containerName", container["name"]) != container["name"]:
        raise ManifestError(f"resourceFieldRef names container {ref['containerName']!r}, not {container['name']!r}")
    kind, _, resource = ref["resource"].partition(".")
    resources = container.get("resources", {})
    # An unset request defaults to the limit, as the API server fills it in.
    value = resources.get(kind, {}).get(resource) or resources.get("limits", {}).get(resource)
    if value is None and kind == "limits":
        value = os.cpu_count() if resource == "cpu" else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return str(math.ceil(quantity(value or 0) / quantity(ref.get("divisor", 1))))


def quantity(text: str | int) -> float:
    """A Kubernetes quantity: "500m" CPUs, "256Mi" or "1G" bytes, "2"."""
    units = {
        "m": 1e-3,
        "": 1,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(text))
    if not match:
        raise ManifestError(f"cannot read the quantity {text!r}")
    return float(match[1]) * units[match[2] or ""]


def _config_map(config_maps: dict[str, dict], ref: dict) -> dict[str, str]:
    if ref["name"] in config_maps:
        return config_maps[ref["name"]].get("data", {})
    if ref.get("optional"):
        return {}
    raise ManifestError(f"ConfigMap {ref['name']!r} is referenced but not in the rendered manifests")


def container_argv(container: dict, image: ImageConfig, env: dict[str, str]) -> list[str]:
    """`command` replaces the image's ENTRYPOINT and drops its CMD; `args` replaces CMD; only the
    manifest's own words are `$(VAR)`-expanded (with the container env, not the image's)."""
    command = [expand(word, env) for word in container.get("command", [])]
    args = [expand(word, env) for word in container.get("args", [])]
    if command:
        return command + args
    return image.entrypoint + (args if "args" in container else image.cmd)


# --- 2. the pod plan --------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageConfig:
    """The final stage of docker/Dockerfile: what a container runtime takes from the image."""

    env: dict[str, str]
    workdir: str
    uid: int
    gid: int
    entrypoint: list[str]
    cmd: list[str]

    @classmethod
    def from_dockerfile(cls, path: Path) -> ImageConfig:
        text = re.sub(
            r"\\\n", " ", "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#"))
        )
        stage = text[text.rindex("\nFROM ") :].splitlines()
        env, workdir, user, entrypoint, cmd = {"PATH": BASE_IMAGE_PATH}, "/", "0:0", [], []
        for line in stage:
            instruction, _, rest = line.strip().partition(" ")
            if instruction == "ENV":
                for pair in shlex.split(rest):
                    key, _, value = pair.partition("=")
                    env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m[1], ""), value)
            elif instruction == "WORKDIR":
                workdir = os.path.join(workdir, rest.strip())
            elif instruction == "USER":
                user = rest.strip()
            elif instruction == "ENTRYPOINT":
                entrypoint = json.loads(rest)
            elif instruction == "CMD":
                cmd = json.loads(rest)
        uid, _, gid = user.partition(":")
        return cls(env, workdir, int(uid), int(gid or uid), entrypoint, cmd)


@dataclass(frozen=True)
class Host:
    """Where the image's files come from on this machine."""

    checkout: Path
    """The clone whose job/ is the image's /app/job, and whose docker/Dockerfile gives its config."""
    venv: Path
    """The virtual environment that stands in for the image's /opt/venv."""
    data: Path
    """A directory with MNIST/raw/: stands in for the MNIST baked into the image at /app/data."""

    @classmethod
    def of(cls, checkout: Path, data: Path) -> Host:
        return cls(checkout=checkout, venv=checkout / ".venv", data=data)

    def python_home(self) -> Path:
        """The interpreter the venv was made from (its bin/python links there)."""
        cfg = dict(
            line.split(" = ", 1) for line in (self.venv / "pyvenv.cfg").read_text().splitlines() if " = " in line
        )
        return Path(cfg["home"]).parent


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
class Manifests:
    """The rendered objects this runner reads; other kinds (NetworkPolicy, ...) are not emulated."""

    job: dict
    services: list[dict]
    config_maps: dict[str, dict]
    claims: set[str]

    @classmethod
    def parse(cls, text: str) -> Manifests:
        docs = [doc for doc in yaml.safe_load_all(text) if doc]
        jobs = [doc for doc in docs if doc["kind"] == "Job"]
        if len(jobs) != 1:
            raise ManifestError(f"expected one Job in the manifests, found {len(jobs)}")
        (job,) = jobs
        if job["spec"].get("completionMode") != "Indexed":
            raise ManifestError("the Job is not completionMode: Indexed; pods would have no index or hostname")
        return cls(
            job=job,
            services=[doc for doc in docs if doc["kind"] == "Service"],
            config_maps={doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "ConfigMap"},
            claims={doc["metadata"]["name"] for doc in docs if doc["kind"] == "PersistentVolumeClaim"},
        )

    @property
    def name(self) -> str:
        return self.job["metadata"]["name"]

    @property
    def namespace(self) -> str:
        return self.job["metadata"].get("namespace", "default")

    @property
    def pod_spec(self) -> dict:
        return self.job["spec"]["template"]["spec"]

    @property
    def completions(self) -> int:
        return self.job["spec"]["completions"]

    def container(self) -> dict:
        containers = self.pod_spec["containers"]
        if len(containers) != 1 or self.pod_spec.get("initContainers"):
            raise ManifestError("this runner runs pods of exactly one container and no init containers")
        return containers[0]

    def pod_facts(self, index: int, job_uid: str, pod_ip: str, host_ip: str) -> PodFacts:
        """A new pod of `index` as the Job controller creates it: a generated name, the Job's labels
        (`job_uid`: the uid the API server gave the Job) and the completion-index annotation added
        to the template's."""
        controller_uid = job_uid
        labels = {
            **self.job["spec"]["template"].get("metadata", {}).get("labels", {}),
            "job-name": self.name,
            "batch.kubernetes.io/job-name": self.name,
            "controller-uid": controller_uid,
            "batch.kubernetes.io/controller-uid": controller_uid,
            "batch.kubernetes.io/job-completion-index": str(index),
        }
        annotations = {
            **self.job["spec"]["template"].get("metadata", {}).get("annotations", {}),
            "batch.kubernetes.io/job-completion-index": str(index),
        }
        suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        return PodFacts(
            name=f"{self.name}-{index}-{suffix}",
            namespace=self.namespace,
            uid=str(uuid.uuid4()),
            labels=labels,
            annotations=annotations,
            pod_ip=pod_ip,
            host_ip=host_ip,
            service_account=self.pod_spec.get("serviceAccountName", "default"),
        )

    def hostname(self, index: int) -> str:
        return self.pod_spec.get("hostname") or f"{self.name}-{index}"

    def fqdn(self, index: int) -> str:
        """The name the kubelet writes next to the hostname in /etc/hosts."""
        subdomain = self.pod_spec.get("subdomain")
        return (
            f"{self.hostname(index)}.{subdomain}.{self.namespace}.svc.{CLUSTER_DOMAIN}"
            if subdomain
            else self.hostname(index)
        )

    def dns_names(self, index: int, labels: dict[str, str]) -> list[str]:
        """Names cluster DNS answers with this pod's IP, in every form the pods' search path
        (<ns>.svc.cluster.local svc.cluster.local cluster.local) completes: the pod's own record
        (hostname.subdomain, only when a headless Service named like the subdomain selects it)
        and each headless Service that selects it."""
        records = []
        for service in self.services:
            spec = service["spec"]
            selector = spec.get("selector") or {}
            if spec.get("clusterIP") != "None" or not selector or any(labels.get(k) != v for k, v in selector.items()):
                continue
            if service["metadata"]["name"] == self.pod_spec.get("subdomain"):
                records.append(f"{self.hostname(index)}.{self.pod_spec['subdomain']}")
            records.append(service["metadata"]["name"])
        ns = self.namespace
        return [
            f"{r}{suffix}" for r in records for suffix in (f".{ns}.svc.{CLUSTER_DOMAIN}", f".{ns}.svc", f".{ns}", "")
        ]


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
    layers), emptydirs/<volume>/, etc/ (hosts, hostname, resolv.conf, passwd, group)."""


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


def hosts_file(own: tuple[str, str, str], records: dict[str, list[str]]) -> str:
    """A pod's /etc/hosts: the kubelet's lines (localhost; this pod's IP, FQDN, hostname) and the
    names cluster DNS would answer: {ip: names}."""
    ip, fqdn, hostname = own
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", f"{ip}\t{fqdn}\t{hostname}"]
    lines += [f"{addr}\t{' '.join(names)}" for addr, names in records.items() if names]
    return "\n".join(lines) + "\n"


# --- 3. the pod -------------------------------------------------------------------------------


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


# --- 4. the network and the Job controller -------------------------------------------------------


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def netns_names() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def kill_netns_processes(name: str) -> None:
    """SIGKILL every process in a network namespace at once (a pod's whole tree: every process
    of a pod is in its network namespace), and wait until they are gone."""
    pids = [int(pid) for pid in ip("netns", "pids", name).split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        while Path(f"/proc/{pid}").exists() and not _is_zombie(pid):
            time.sleep(0.01)


def delete_netns(name: str) -> None:
    kill_netns_processes(name)  # a namespace outlives its name while a process is still in it
    ip("netns", "delete", name)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def remove_leftovers() -> list[str]:
    """Namespaces (and the processes in them) of runs whose creating process is gone."""
    removed = []
    for name in netns_names():
        match = re.match(rf"{PREFIX}(\d+)-", name)
        if match and not Path(f"/proc/{match[1]}").exists():
            delete_netns(name)
            removed.append(name)
    return removed


class Network:
    """The "node": a bridge in a network namespace of its own, and one veth from it into each pod's
    network namespace (eth0, a pod IP). Nothing is added to the host's own network namespace."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.node = f"{prefix}-node"
        self.host_ip = f"{SUBNET}.1"
        self._pods = 0
        self._had_netns_mount = _is_mount_point("/run/netns")

    def create(self) -> None:
        ip("netns", "add", self.node)
        ip("-n", self.node, "link", "add", "br0", "type", "bridge")
        ip("-n", self.node, "addr", "add", f"{self.host_ip}/24", "dev", "br0")
        ip("-n", self.node, "link", "set", "br0", "up")

    def add_pod(self, netns: str) -> str:
        """A new network namespace wired to the bridge; returns its IP (a new one per pod, as in a cluster)."""
        self._pods += 1
        addr, peer = f"{SUBNET}.{self._pods + 1}", f"veth{self._pods}"
        ip("netns", "add", netns)
        ip("-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", peer, "netns", self.node)
        ip("-n", netns, "addr", "add", f"{addr}/24", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        ip("-n", netns, "link", "set", "lo", "up")
        ip("-n", netns, "route", "add", "default", "via", self.host_ip)
        ip("-n", self.node, "link", "set", peer, "master", "br0", "up")
        return addr

    def destroy(self) -> None:
        """Every namespace of this run, the pods' too: what a failed pod deletion left is gone as well."""
        for name in netns_names():
            if name.startswith(f"{self.prefix}-"):
                delete_netns(name)
        # `ip netns add` makes /run/netns a mount point the first time; undo that once it is unused.
        if not self._had_netns_mount and _is_mount_point("/run/netns") and not os.listdir("/run/netns"):
            subprocess.run(["umount", "/run/netns"], check=True)


def _is_mount_point(path: str) -> bool:
    return any(line.split()[1] == path for line in Path("/proc/mounts").read_text().splitlines())


@dataclass
class Pod:
    index: int
    plan: PodPlan
    netns: str
    ip: str
    fqdn: str
    dns_names: list[str]
    log: Path
    process: subprocess.Popen
    exit_code: int | None = None


class JobFailed(RuntimeError):
    """The Job ended Failed (backoff limits, podFailurePolicy, activeDeadlineSeconds) or timed out."""


class LocalJob:
    """The Job controller and the kubelet of one node: a pod per pending index (up to
    `parallelism`); a failed pod replaced by a new one of the same index after the back-off, until
    `backoffLimit` (or `backoffLimitPerIndex` and `maxFailedIndexes`); `podFailurePolicy` exit-code
    rules and `activeDeadlineSeconds` applied. (Pods here never get conditions such as
    DisruptionTarget, so `onPodConditions` rules never match.)"""

    def __init__(self, manifests: Manifests, host: Host, work: Path) -> None:
        self.manifests = manifests
        self.host = host
        self.image = ImageConfig.from_dockerfile(host.checkout / "docker" / "Dockerfile")
        self.work = work
        self.prefix = f"{PREFIX}{os.getpid()}"
        self.network = Network(self.prefix)
        self.uid = str(uuid.uuid4())
        self.running: dict[int, Pod] = {}
        self.history: list[Pod] = []
        self.succeeded: set[int] = set()
        self.failed_indexes: set[int] = set()
        self.failures = [0] * manifests.completions
        self._not_before = [0.0] * manifests.completions
        self._started = 0.0

    @property
    def spec(self) -> dict:
        return self.manifests.job["spec"]

    def claim_dir(self, claim: str) -> Path:
        """The host directory that stands in for the PersistentVolumeClaim `claim`."""
        return self.work / "shared" / "pvc" / claim

    def host_path(self, pod_path: str) -> Path:
        """Where a path in the pods that lies on the PVC is on this machine."""
        by_name = {volume["name"]: volume for volume in self.manifests.pod_spec.get("volumes", [])}
        for mount in self.manifests.container().get("volumeMounts", []):
            claim = by_name[mount["name"]].get("persistentVolumeClaim")
            relative = os.path.relpath(pod_path, mount["mountPath"])
            if claim and not relative.startswith(".."):
                return self.claim_dir(claim["claimName"]) / mount.get("subPath", "") / relative
        raise ValueError(f"{pod_path} is not on a PersistentVolumeClaim of the pods")

    def __enter__(self) -> LocalJob:
        remove_leftovers()
        self._materialize_shared_volumes()
        self.network.create()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for pod in list(self.running.values()):
                self._delete(pod)
        finally:
            self.network.destroy()

    def _materialize_shared_volumes(self) -> None:
        for volume in self.manifests.pod_spec.get("volumes", []):
            if "configMap" in volume:
                folder = self.work / "shared" / "configmaps" / volume["name"]
                folder.mkdir(parents=True)
                data = _config_map(self.manifests.config_maps, volume["configMap"])
                items = volume["configMap"].get("items") or [{"key": key, "path": key} for key in data]
                for item in items:
                    path = folder / item["path"]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(data[item["key"]])
                    path.chmod(item.get("mode", volume["configMap"].get("defaultMode", 0o644)))
        # A fresh volume is root's, mode 0755; with fsGroup the kubelet hands it to that group, setgid.
        fs_group = self.manifests.pod_spec.get("securityContext", {}).get("fsGroup")
        for claim in self.manifests.claims:
            folder = self.claim_dir(claim)
            folder.mkdir(parents=True, exist_ok=True)
            if fs_group is not None:
                os.chown(folder, 0, fs_group)
                folder.chmod(0o2775)

    def start(self) -> None:
        self._started = time.monotonic()
        self.sync()

    def sync(self) -> None:
        """One pass of the controller: reap ended pods, count failures, start pods for pending indexes."""
        for pod in list(self.running.values()):
            code = pod.process.poll()
            if code is not None:
                pod.exit_code = code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as the runtime reports
                self._delete(pod)
                if pod.exit_code == 0:
                    self.succeeded.add(pod.index)
                else:
                    self._count_failure(pod)
        deadline = self.spec.get("activeDeadlineSeconds")
        if deadline and time.monotonic() - self._started > deadline:
            self._fail(f"DeadlineExceeded: activeDeadlineSeconds={deadline}")
        done = self.succeeded | self.failed_indexes
        pending = [i for i in range(self.manifests.completions) if i not in done and i not in self.running]
        room = self.spec.get("parallelism", 1) - len(self.running)
        for index in [i for i in pending if time.monotonic() >= self._not_before[i]][: max(room, 0)]:
            self._start_pod(index)

    def _count_failure(self, pod: Pod) -> None:
        policy = self.spec.get("podFailurePolicy")
        action = failure_action(policy, self.manifests.container()["name"], pod.exit_code)
        if action == "Ignore":
            return
        if action == "FailJob":
            self._fail(f"podFailurePolicy: FailJob on exit code {pod.exit_code} of pod {pod.plan.name}")
        self.failures[pod.index] += 1
        per_index = self.spec.get("backoffLimitPerIndex")
        if per_index is None:
            if sum(self.failures) > self.spec.get("backoffLimit", 6):
                self._fail(f"BackoffLimitExceeded: {sum(self.failures)} failed pods")
        elif action == "FailIndex" or self.failures[pod.index] > per_index:
            self.failed_indexes.add(pod.index)
            if len(self.failed_indexes) > self.spec.get("maxFailedIndexes", self.manifests.completions):
                self._fail(f"MaxFailedIndexesExceeded: failed indexes {sorted(self.failed_indexes)}")
        delay = min(BACKOFF_BASE_S * 2 ** (self.failures[pod.index] - 1), BACKOFF_MAX_S)
        self._not_before[pod.index] = time.monotonic() + delay

    def _fail(self, reason: str) -> None:
        for pod in list(self.running.values()):
            self._delete(pod)
        raise JobFailed(f"Job {self.manifests.name} failed: {reason}\n{self.logs()}")

    def _start_pod(self, index: int) -> None:
        netns = f"{self.prefix}-{self.manifests.name[:30]}-{index}-{len(self.history)}"
        pod_ip = self.network.add_pod(netns)
        facts = self.manifests.pod_facts(index, self.uid, pod_ip, self.network.host_ip)
        dirs = HostDirs(shared=self.work / "shared", pod=self.work / "pods" / facts.name)
        plan = plan_pod(self.manifests, self.image, self.host, facts, index, dirs)
        self._make_pod_dirs(dirs.pod, plan)
        plan_file = dirs.pod / "plan.json"
        plan_file.write_text(plan.to_json())
        log = self.work / "logs" / f"{facts.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        command = [
            "ip", "netns", "exec", netns,
            "unshare", "--mount", "--uts", "--pid", "--fork", "--kill-child", "--propagation", "private",
            sys.executable, __file__, "enter", str(plan_file),
        ]  # fmt: skip
        with open(log, "w") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        names = self.manifests.dns_names(index, facts.labels)
        pod = Pod(index, plan, netns, pod_ip, self.manifests.fqdn(index), names, log, process)
        self.running[index] = pod
        self.history.append(pod)
        self._publish_dns()

    def _make_pod_dirs(self, folder: Path, plan: PodPlan) -> None:
        (folder / "root").mkdir(parents=True)
        (folder / "layers").mkdir()
        for volume in self.manifests.pod_spec.get("volumes", []):
            if "emptyDir" in volume and volume["emptyDir"].get("medium") != "Memory":
                empty = folder / "emptydirs" / volume["name"]
                empty.mkdir(parents=True)
                empty.chmod(0o777)  # as the kubelet makes them: any user of the pod may write
        etc = folder / "etc"
        etc.mkdir()
        ns = self.manifests.namespace
        (etc / "hosts").touch()  # written by _publish_dns
        (etc / "hostname").write_text(plan.hostname + "\n")
        (etc / "resolv.conf").write_text(
            f"search {ns}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}\n"
            # Nothing listens there: a name missing from /etc/hosts fails at once, as NXDOMAIN would.
            f"nameserver {self.network.host_ip}\noptions ndots:5\n"
        )
        user = f"job:x:{self.image.uid}:{self.image.gid}::/tmp:/usr/sbin/nologin\n"
        (etc / "passwd").write_text(Path("/etc/passwd").read_text() + user)
        (etc / "group").write_text(Path("/etc/group").read_text() + f"job:x:{self.image.gid}:\n")

    def _publish_dns(self) -> None:
        """Rewrite every running pod's /etc/hosts in place (a bind mount follows the inode, not the
        name), so that "cluster DNS" answers for the pods that exist now."""
        records = {pod.ip: pod.dns_names for pod in self.running.values()}
        for pod in self.running.values():
            with open(Path(pod.plan.root).parent / "etc" / "hosts", "r+") as hosts:
                hosts.truncate()
                hosts.write(hosts_file((pod.ip, pod.fqdn, pod.plan.hostname), records))

    def _delete(self, pod: Pod) -> None:
        """The pod is gone: its processes, its network namespace, its IP and DNS names."""
        if pod.process.poll() is None:
            kill_netns_processes(pod.netns)
            pod.process.wait()
            pod.exit_code = 128 + signal.SIGKILL
        delete_netns(pod.netns)
        del self.running[pod.index]
        self._publish_dns()

    def kill(self, index: int) -> Pod:
        """SIGKILL the whole process tree of index's pod at once (a lost node, an OOM-killed
        container); the next sync sees it failed and replaces it."""
        pod = self.running[index]
        kill_netns_processes(pod.netns)
        pod.process.wait()
        return pod

    def terminate(self, index: int) -> Pod:
        """Delete index's pod gracefully, as a preemption or an eviction does: SIGTERM to the
        container's PID 1, SIGKILL to whatever is left after terminationGracePeriodSeconds."""
        import psutil

        pod = self.running[index]
        (init,) = psutil.Process(pod.process.pid).children()  # unshare's child: PID 1 in the pod
        init.send_signal(signal.SIGTERM)
        try:
            pod.process.wait(timeout=self.manifests.pod_spec.get("terminationGracePeriodSeconds", 30))
        except subprocess.TimeoutExpired:
            kill_netns_processes(pod.netns)
            pod.process.wait()
        return pod

    def wait(self, timeout: float, until: Callable[[], bool] | None = None) -> bool:
        """Run the controller until every index succeeded (True) or `until()` holds (False)."""
        deadline = time.monotonic() + timeout
        while len(self.succeeded) + len(self.failed_indexes) < self.manifests.completions:
            if until is not None and until():
                return False
            if time.monotonic() > deadline:
                self._fail(f"not done within {timeout:.0f} s")
            time.sleep(0.1)
            self.sync()
        if self.failed_indexes:
            self._fail(f"FailedIndexes: {sorted(self.failed_indexes)}")
        return True

    def logs(self) -> str:
        return "\n".join(
            f"===== pod {pod.plan.name} (index {pod.index}, exit {pod.exit_code})\n{pod.log.read_text()}"
            for pod in self.history
        )


def failure_action(policy: dict | None, container: str, exit_code: int) -> str:
    """podFailurePolicy: the action of the first onExitCodes rule that matches, else Count."""
    for rule in (policy or {}).get("rules", []):
        codes = rule.get("onExitCodes")
        if not codes or codes.get("containerName", container) != container:
            continue
        if (exit_code in codes["values"]) == (codes["operator"] == "In"):
            return rule["action"]
    return "Count"


if __name__ == "__main__":
    if sys.argv[1:2] == ["enter"] and len(sys.argv) == 3:
        enter(PodPlan.from_json(Path(sys.argv[2]).read_text()))
    else:
        sys.exit(f"usage: {sys.argv[0]} enter PLAN.json  (run by LocalJob inside a pod's namespaces)")
