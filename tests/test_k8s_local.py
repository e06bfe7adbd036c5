"""`make k8s-local-test`: the rendered Kubernetes Job, run on this machine as a cluster would.

The manifests are k8s/overlays/cpu (2 pods x 1 process, gloo) under an overlay of the kind a
user writes to train on their own data: the configMapGenerator adds tiny.yaml (generated
data: no checksums, a small run) and JOB_CONFIG names it. Nothing else of the rendered Job
changes: tests/k8s_local/ runs its exact command, args and env in one "pod" per
completion index (own network, mount, UTS and PID namespaces; pod IP, hostname, DNS names,
volumes, user). A shared directory stands in for the PersistentVolumeClaim. (The probe and
exit-code tests replace the container's args, as an overlay patch could, to look at what the
pods see and at what the Job does with their exit codes.)

Needs root, iproute2, util-linux and tini; .venv-k8s's kubectl renders the manifests.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from helpers import K8S_BIN, REPO, assert_same_weights, checkpoint_steps, make_tiny_mnist, tool
from k8s_local.controller import BACKOFF_BASE_S, JobFailed, LocalJob
from k8s_local.image import Host
from k8s_local.manifests import Manifests
from k8s_local.network import PREFIX, Network, delete_netns, ip, netns_names, remove_leftovers

from job.run_dir import RunDir


def shipped_configs() -> list[str]:
    """The job configs the image's ConfigMap holds (job/configs/kustomization.yaml's generator)."""
    kustomization = yaml.safe_load((REPO / "job" / "configs" / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    return generator["files"]


pytestmark = [pytest.mark.k8s_local, pytest.mark.processes]

OVERLAY = REPO / "k8s" / "overlays" / "cpu"
RUN_DIR = "/app/runs/k8s-local"  # in the pod: on the runs PVC
STEPS_PER_EPOCH, EPOCHS, CHECKPOINT_EVERY = 50, 2, 10
TINY_CONFIG = f"""\
# The recipe on generated digits ({STEPS_PER_EPOCH * 64} samples), with a checkpoint every {CHECKPOINT_EVERY} steps.
seed: 1
data:
  verify: false          # generated IDX files, not MNIST's
  test_batch_size: 50
optim:
  lr: 0.05
train:
  epochs: {EPOCHS}
  log_interval: 5
checkpoint:
  every_steps: {CHECKPOINT_EVERY}
run:
  name: k8s-local
"""
KUSTOMIZATION = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {base}
configMapGenerator:
  - name: mnist-ddp-config
    behavior: merge
    files:
      - tiny.yaml
patches:
  - patch: |
      apiVersion: batch/v1
      kind: Job
      metadata:
        name: mnist-ddp
      spec:
        template:
          spec:
            containers:
              - name: trainer
                env:
                  - name: JOB_CONFIG
                    value: tiny.yaml
"""


def require_root_and_tools() -> None:
    """No skip: `make k8s-local-test` on a machine that cannot run it is a failure, with the fix."""
    if os.geteuid() != 0:
        pytest.fail("make k8s-local-test needs root (network namespaces, mounts, chroot)", pytrace=False)
    # tini: the image's ENTRYPOINT, which the pods take from this machine's /usr.
    missing = [name for name in ("ip", "unshare", "mount", "tini") if shutil.which(name) is None]
    if missing:
        pytest.fail(
            f"make k8s-local-test needs {', '.join(missing)}: apt-get install iproute2 util-linux mount tini",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def manifests(tmp_path_factory, k8s_venv) -> Manifests:
    require_root_and_tools()
    overlay = tmp_path_factory.mktemp("overlay")
    (overlay / "tiny.yaml").write_text(TINY_CONFIG)
    # kustomize takes only relative paths to other kustomizations
    (overlay / "kustomization.yaml").write_text(KUSTOMIZATION.format(base=os.path.relpath(OVERLAY, overlay)))
    kubectl = [tool(K8S_BIN, "kubectl"), "kustomize", str(overlay)]
    rendered = subprocess.run(kubectl, capture_output=True, text=True, check=True)
    return Manifests.parse(rendered.stdout)


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Host:
    """This checkout as the image, with generated digits standing in for the baked MNIST."""
    return Host.of(REPO, data=make_tiny_mnist(tmp_path_factory.mktemp("image") / "data", train=STEPS_PER_EPOCH * 64))


class Leftovers:
    """What a run may leave behind on the host: compared before and after."""

    def __init__(self, work: Path) -> None:
        self.work = str(work)
        self.links = self._links()
        self.mount_points = self._mount_points()

    @staticmethod
    def _links() -> set[str]:
        return {
            line.split(":")[1].strip().split("@")[0]
            for line in subprocess.check_output(["ip", "-o", "link"], text=True).splitlines()
        }

    @staticmethod
    def _mount_points() -> set[str]:
        return {line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()}

    def assert_none(self) -> None:
        # Only this process's namespaces (PREFIX<pid>-): another test run on the machine has its own.
        ours = f"{PREFIX}{os.getpid()}-"
        assert not [name for name in netns_names() if name.startswith(ours)], "network namespaces left"
        assert self._links() == self.links, "network interfaces left in the host's namespace"
        new = self._mount_points() - self.mount_points
        left = {p for p in new if p.startswith(self.work) or ours in p or (p == "/run/netns" and not netns_names())}
        assert not left and ours not in Path("/proc/mounts").read_text(), f"mounts left: {left}"


def run_to_completion(manifests: Manifests, host: Host, work: Path) -> LocalJob:
    leftovers = Leftovers(work)
    with LocalJob(manifests, host, work) as job:
        job.start()
        job.wait(timeout=240)
    leftovers.assert_none()
    return job


@pytest.fixture(scope="module")
def reference(manifests, host, tmp_path_factory) -> Path:
    """The uninterrupted run's run directory (on the PVC)."""
    job = run_to_completion(manifests, host, tmp_path_factory.mktemp("reference"))
    return job.host_path(RUN_DIR)


# Run in place of the job's command (as an overlay could patch the args): what each pod sees.
PROBE = """
peer=mnist-ddp-$((1 - JOB_COMPLETION_INDEX))
for _ in $(seq 100); do getent hosts "$peer.mnist-ddp" >/dev/null && break; sleep 0.1; done
echo "hostname=$(hostname) index=$JOB_COMPLETION_INDEX pod_ip=$POD_IP"
echo "eth0=$(ip -4 -o addr show dev eth0 | awk '{print $4}')"
echo "peer=$(getent hosts "$peer.mnist-ddp.default.svc.cluster.local" | cut -d' ' -f1)"
echo "bare_peer=$(getent hosts "$peer" || echo unresolved)"
echo "ids=$(id -u) $(id -g) $(id -G) pwd=$(pwd) pid1=$(tr '\\0\\n' '  ' < /proc/1/cmdline | cut -d' ' -f1-4)"
echo "torchrun=$(command -v torchrun) job=$(python -c 'import job; print(job.__file__)')"
touch /app/job/x 2>/dev/null && echo image=writable || echo image=read-only
touch "/app/runs/probe-$JOB_COMPLETION_INDEX" /tmp/x /dev/shm/x && echo volumes=writable
echo "config=$(ls /etc/mnist-ddp/config | tr '\\n' ' ')"
sleep 2  # alive while the other pod looks this one up
"""


def test_each_pod_sees_what_a_cluster_pod_would(manifests, host, tmp_path):
    probe = copy.deepcopy(manifests)
    probe.container()["args"] = ["/bin/sh", "-c", PROBE]
    leftovers = Leftovers(tmp_path)
    with LocalJob(probe, host, tmp_path) as job:
        job.start()
        job.wait(timeout=60)
    leftovers.assert_none()

    ips = {pod.index: pod.ip for pod in job.history}
    for pod in job.history:
        seen = dict(re.findall(r"(\w+)=(.*?)(?= \w+=|$)", pod.log.read_text(), re.M))
        assert seen["hostname"] == f"mnist-ddp-{pod.index}" and seen["index"] == str(pod.index), seen
        assert seen["pod_ip"] == pod.ip and seen["eth0"] == f"{pod.ip}/24"
        assert seen["peer"] == ips[1 - pod.index] and seen["bare_peer"] == "unresolved"
        assert seen["ids"] == "10001 10001 10001" and seen["pwd"] == "/app"
        assert seen["pid1"] == "/usr/bin/tini -- /bin/sh -c"
        assert seen["torchrun"] == "/opt/venv/bin/torchrun" and seen["job"] == "/app/job/__init__.py"
        assert seen["image"] == "read-only" and seen["volumes"] == "writable"
        assert set(seen["config"].split()) == {*shipped_configs(), "tiny.yaml"}
    assert sorted(p.name for p in job.host_path("/app/runs").glob("probe-*")) == ["probe-0", "probe-1"]


def test_two_pods_train_the_job_to_completion(reference):
    summary = json.loads(RunDir(reference).summary.read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert summary["resumes"] == 0
    # Rank 0 ran in pod 0 (TensorBoard names its file after the host) as the image's user, whose
    # group (fsGroup) owns the volume.
    (events,) = RunDir(reference).tensorboard.glob("events.out.tfevents.*")
    assert ".mnist-ddp-0." in events.name
    assert {(p.stat().st_uid, p.stat().st_gid) for p in reference.rglob("*")} == {(10001, 10001)}


@pytest.mark.parametrize(
    ("victim", "how"),
    [(1, "kill"), (0, "kill"), (1, "terminate")],
    ids=["killed-worker-pod", "killed-rendezvous-host-pod", "preempted-worker-pod"],
)
def test_a_lost_pod_is_replaced_and_the_job_ends_with_the_uninterrupted_bits(
    manifests, host, reference, tmp_path, victim, how
):
    """kill: SIGKILL to the pod's whole process tree (a lost node, an OOM kill); terminate: the
    graceful deletion of a preemption (SIGTERM, then SIGKILL after the grace period)."""
    leftovers = Leftovers(tmp_path)
    with LocalJob(manifests, host, tmp_path) as job:
        job.start()
        run_dir = job.host_path(RUN_DIR)
        job.wait(timeout=240, until=lambda: max(checkpoint_steps(run_dir), default=0) >= 2 * CHECKPOINT_EVERY)
        lost = getattr(job, how)(victim)
        job.wait(timeout=240)
    leftovers.assert_none()

    logs = job.logs()
    assert sorted(pod.index for pod in job.history if pod.exit_code == 0) == [0, 1], logs
    replacement = next(pod for pod in job.history if pod.index == victim and pod.exit_code == 0)
    assert replacement.plan.name != lost.plan.name and replacement.ip != lost.ip
    others = [pod.exit_code for pod in job.history if pod.index != victim]
    if how == "terminate":  # every rank stopped at the same step and checkpointed: 75, not a failure
        assert lost.exit_code == 75 and others == [0] and job.failures == [0, 0], logs
    elif victim == 1:  # pod 0 survived: its torchrun (the rendezvous host) took the new pod in
        assert lost.exit_code == 137 and others == [0], logs
    else:  # pod 1 lost the rendezvous store with pod 0: it failed too (one failure on its index)
        assert lost.exit_code == 137 and others == [1, 0], logs
    # The run really resumed mid-run, from a checkpoint written before the kill.
    events = [json.loads(line) for line in RunDir(run_dir).metrics.read_text().splitlines()]
    resumes = [event["step"] for event in events if event["event"] == "resume"]
    assert resumes and all(2 * CHECKPOINT_EVERY <= step < EPOCHS * STEPS_PER_EPOCH for step in resumes), logs
    assert_same_weights(run_dir, reference)


def test_a_replacement_pod_waits_for_the_lock_its_frozen_predecessor_holds_and_resumes(
    manifests, host, reference, tmp_path
):
    """Issue 21 case 3 through the Job: pod mnist-ddp-0, whose rank 0 holds the run directory's
    lock, loses its node but lives on, frozen; the Job replaces it (DisruptionTarget: Ignore) by a
    pod with the same hostname on another node (another boot id), which waits for the holder it
    cannot see instead of exiting 2 (FailJob), and resumes once the old pod is gone.

    Pod 1 is killed as well: its torchrun agent is connected to the rendezvous store that the
    frozen pod hosts, and a TCPStore call to a frozen peer outlives its timeout (torch 2.14.1: a
    get with a 5 s timeout still blocked after 180 s), so pod 1 would hang until
    activeDeadlineSeconds (a defect of its own, k8s/README.md). Its replacement meets pod 0's at
    the new store."""
    leftovers = Leftovers(tmp_path)
    with LocalJob(manifests, host, tmp_path) as job:
        job.start()
        run_dir = job.host_path(RUN_DIR)
        job.wait(timeout=240, until=lambda: max(checkpoint_steps(run_dir), default=0) >= 2 * CHECKPOINT_EVERY)
        old = job.running[0]
        old_boot = (Path(old.plan.root).parent / "boot_id").read_text().strip()
        assert re.match(r"pid \d+ on mnist-ddp-0 ", RunDir(run_dir).lock.read_text()), "rank 0 runs in pod 0"
        job.lose_node(0)
        job.sync()  # the replacement pod 0: at once, nothing counted
        job.kill(1)
        job.wait(timeout=300, until=lambda: any("waiting up to" in p.log.read_text() for p in job.running.values()))
        waiting = next(p for p in job.running.values() if "waiting up to" in p.log.read_text())
        assert old.process.poll() is None, "the old pod was alive (frozen) while its replacement waited"
        job.end_lost(old)  # the lost node is fenced at last
        job.wait(timeout=240)
    leftovers.assert_none()

    logs = job.logs()
    assert waiting.index == 0 and waiting.plan.hostname == "mnist-ddp-0" and waiting.plan.name != old.plan.name
    assert waiting.exit_code == 0 and (Path(waiting.plan.root).parent / "boot_id").read_text().strip() != old_boot
    assert re.search(rf"locked by another job \(pid \d+ on mnist-ddp-0 \(boot {old_boot}, ", waiting.log.read_text())
    assert 2 not in [pod.exit_code for pod in job.history], logs  # exit 2 is FailJob: the Job would be lost
    assert sorted(pod.index for pod in job.history if pod.exit_code == 0) == [0, 1], logs
    events = [json.loads(line) for line in RunDir(run_dir).metrics.read_text().splitlines()]
    resumes = [event["step"] for event in events if event["event"] == "resume"]
    assert resumes and all(2 * CHECKPOINT_EVERY <= step < EPOCHS * STEPS_PER_EPOCH for step in resumes), logs
    assert_same_weights(run_dir, reference)


@pytest.mark.parametrize(
    ("script", "outcome"),
    [
        ("exit 2", "FailJob"),  # bad input: retrying cannot help
        # preempted once per index: replaced at once, no failure counted, then done
        ('[ -e "/app/runs/once-$JOB_COMPLETION_INDEX" ] || { touch "/app/runs/once-$JOB_COMPLETION_INDEX"; exit 75; }',
         "replaced"),
    ],
    ids=["bad-input", "preempted"],
)  # fmt: skip
def test_the_job_s_failure_policy_decides_what_a_pod_s_exit_code_does(manifests, host, tmp_path, script, outcome):
    probe = copy.deepcopy(manifests)
    probe.container()["args"] = ["/bin/sh", "-c", script]
    leftovers = Leftovers(tmp_path)
    started = time.monotonic()
    with LocalJob(probe, host, tmp_path) as job:
        job.start()
        if outcome == "FailJob":
            with pytest.raises(JobFailed, match="podFailurePolicy: FailJob on exit code 2"):
                job.wait(timeout=60)
        else:
            job.wait(timeout=60)
            assert sorted((pod.index, pod.exit_code) for pod in job.history) == [(0, 0), (0, 75), (1, 0), (1, 75)]
            assert job.failures == [0, 0]
    assert time.monotonic() - started < BACKOFF_BASE_S, "no back-off: nothing counted as a failure"
    leftovers.assert_none()


def test_an_error_while_the_pods_run_leaves_nothing_behind(manifests, host, tmp_path):
    leftovers = Leftovers(tmp_path)
    with pytest.raises(RuntimeError, match="a failing test"), LocalJob(manifests, host, tmp_path) as job:
        job.start()
        job.wait(timeout=120, until=lambda: RunDir(job.host_path(RUN_DIR)).config.exists())  # training
        raise RuntimeError("a failing test")
    assert all(pod.process.poll() is not None for pod in job.history)
    leftovers.assert_none()


def test_the_leftovers_of_a_crashed_run_are_removed_and_a_live_run_s_kept(tmp_path):
    require_root_and_tools()
    leftovers = Leftovers(tmp_path)
    ended = subprocess.Popen(["true"])
    ended.wait()
    crashed = f"{PREFIX}{ended.pid}-crashed"
    live = Network(f"{PREFIX}{os.getpid()}")
    live.create()
    ip("netns", "add", crashed)
    orphan = subprocess.Popen(["ip", "netns", "exec", crashed, "sleep", "300"])
    try:
        while not ip("netns", "pids", crashed).split():
            time.sleep(0.01)
        assert remove_leftovers() == [crashed]
        assert orphan.wait(timeout=10) == -9
        assert crashed not in netns_names() and live.node in netns_names()
    finally:
        if crashed in netns_names():
            delete_netns(crashed)
        live.destroy()
    leftovers.assert_none()
