"""The Job controller and the kubelet of one node (root): pods started per pending index, failed
ones replaced after the back-off, the Job's failure policy and deadline applied."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .image import Host, ImageConfig
from .kubelet import hosts_file
from .manifests import CLUSTER_DOMAIN, Manifests, config_map_data
from .network import PREFIX, Network, delete_netns, ip, kill_netns_processes, remove_leftovers
from .plan import HostDirs, PodPlan, plan_pod

TESTS = Path(__file__).resolve().parents[1]  # where `python -m k8s_local.pod` finds the package
# The Job controller delays a failed index's next pod by 10 s, doubling per failure, up to 6 min.
BACKOFF_BASE_S, BACKOFF_MAX_S = 10, 360


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
    conditions: tuple[str, ...] = ()
    """Pod conditions of type X with status True (DisruptionTarget), for podFailurePolicy."""


class JobFailed(RuntimeError):
    """The Job ended Failed (backoff limits, podFailurePolicy, activeDeadlineSeconds) or timed out."""


class LocalJob:
    """The Job controller and the kubelet of one node: a pod per pending index (up to
    `parallelism`); a failed pod replaced by a new one of the same index after the back-off, until
    `backoffLimit` (or `backoffLimitPerIndex` and `maxFailedIndexes`); `podFailurePolicy` exit-code
    rules and `activeDeadlineSeconds` applied. Each pod runs as on a node of its own (a boot id of its
    own); `lose_node` loses a pod's node with the pod still running on it, the one way a pod here gets
    the DisruptionTarget condition that `onPodConditions` rules match."""

    def __init__(self, manifests: Manifests, host: Host, work: Path) -> None:
        self.manifests = manifests
        self.host = host
        self.image = ImageConfig.from_dockerfile(host.checkout / "docker" / "Dockerfile")
        self.work = work
        self.prefix = f"{PREFIX}{os.getpid()}"
        self.network = Network(self.prefix)
        self.uid = str(uuid.uuid4())
        self.running: dict[int, Pod] = {}
        self.lost: list[Pod] = []  # failed by lose_node, their processes frozen, until end_lost
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
            for pod in list(self.lost):
                self.end_lost(pod)
        finally:
            self.network.destroy()

    def _materialize_shared_volumes(self) -> None:
        for volume in self.manifests.pod_spec.get("volumes", []):
            if "configMap" in volume:
                folder = self.work / "shared" / "configmaps" / volume["name"]
                folder.mkdir(parents=True)
                data = config_map_data(self.manifests.config_maps, volume["configMap"])
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
        action = failure_action(policy, self.manifests.container()["name"], pod.exit_code, pod.conditions)
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
            sys.executable, "-m", "k8s_local.pod", "enter", str(plan_file),
        ]  # fmt: skip
        with open(log, "w") as out:
            process = subprocess.Popen(command, cwd=TESTS, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
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
        (folder / "boot_id").write_text(f"{uuid.uuid4()}\n")  # the pod's node, booted once
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

    def lose_node(self, index: int) -> Pod:
        """Lose index's node with its pod still running there (a network partition, a hung node):
        every process of the pod is frozen (SIGSTOP), holding what it holds (the run directory's
        lock), and the pod is marked Failed with the DisruptionTarget condition, as the pod garbage
        collector does to a pod bound to a node that is gone or tainted out-of-service. The next
        sync replaces it per podFailurePolicy (the Job's rules Ignore DisruptionTarget), with the
        same hostname, on another node (another boot id); its processes live on until end_lost."""
        pod = self.running.pop(index)
        for pid in [int(pid) for pid in ip("netns", "pids", pod.netns).split()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        pod.conditions = ("DisruptionTarget",)
        self.lost.append(pod)
        self._publish_dns()  # cluster DNS drops a failed pod's records
        self._count_failure(pod)
        return pod

    def end_lost(self, pod: Pod) -> None:
        """The lost node reboots (or is fenced): the frozen pod's processes are gone."""
        delete_netns(pod.netns)  # SIGKILL ends stopped processes too
        pod.process.wait()
        pod.exit_code = 128 + signal.SIGKILL
        self.lost.remove(pod)

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


def failure_action(policy: dict | None, container: str, exit_code: int | None, conditions: tuple[str, ...] = ()) -> str:
    """podFailurePolicy: the action of the first rule that matches, else Count. onExitCodes needs
    the container's exit code (none for a pod failed by the pod garbage collector: its container
    never reported one); onPodConditions matches a condition the pod has with status True."""
    for rule in (policy or {}).get("rules", []):
        if patterns := rule.get("onPodConditions"):
            if any(p["type"] in conditions and p.get("status", "True") == "True" for p in patterns):
                return rule["action"]
            continue
        codes = rule.get("onExitCodes")
        if not codes or exit_code is None or codes.get("containerName", container) != container:
            continue
        if (exit_code in codes["values"]) == (codes["operator"] == "In"):
            return rule["action"]
    return "Count"
