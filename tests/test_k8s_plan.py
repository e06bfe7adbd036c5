"""The pure parts of tests/k8s_local/: the kubelet's rules, the pod plan and the Job's failure
policy (no root, no kubectl).

`make k8s-local-test` runs the real rendered Job with them; these pin each rule on its own.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import REPO
from k8s_local.controller import failure_action
from k8s_local.image import Host, ImageConfig
from k8s_local.kubelet import container_argv, expand, hosts_file, quantity, resolve_env
from k8s_local.manifests import ManifestError, Manifests, PodFacts
from k8s_local.plan import Dir, HostDirs, Mount, image_steps, plan_pod

FIXTURE = REPO / "tests" / "fixtures" / "k8s-job.yaml"
IMAGE = ImageConfig.from_dockerfile(REPO / "docker" / "Dockerfile")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("--rank=$(RANK)", "--rank=3"),
        ("$(RANK)$(RANK)", "33"),
        ("$(UNDEFINED) stays", "$(UNDEFINED) stays"),
        ("$$(RANK) is escaped", "$(RANK) is escaped"),
        ("$$$(RANK)", "$3"),
        ("cost: $$5", "cost: $5"),
        ("$RANK and ${RANK} are the shell's", "$RANK and ${RANK} are the shell's"),
        ("$(RANK", "$(RANK"),
        ("ends with $", "ends with $"),
        ("$(EMPTY)x", "x"),
    ],
)
def test_expand_follows_the_kubelet_rules(text, expected):
    assert expand(text, {"RANK": "3", "EMPTY": ""}) == expected


def pod_facts(**extra) -> PodFacts:
    return PodFacts(
        name="job-1-abcde",
        namespace="ml",
        uid="pod-uid",
        labels={"job-name": "job"},
        annotations={"batch.kubernetes.io/job-completion-index": "1"},
        pod_ip="10.244.0.3",
        host_ip="10.244.0.1",
        **extra,
    )


def test_env_values_see_only_the_variables_defined_before_them():
    container = {
        "name": "c",
        "env": [
            {"name": "EARLY", "value": "$(LATE)-$(A)"},
            {"name": "A", "value": "a"},
            {"name": "B", "value": "$(A)b"},
            {"name": "LATE", "value": "late"},
            {"name": "A", "value": "again"},
        ],
    }
    env = resolve_env(container, pod_facts(), {})
    assert env == {"EARLY": "$(LATE)-$(A)", "A": "again", "B": "ab", "LATE": "late"}


def test_env_from_the_downward_api_and_config_maps():
    container = {
        "name": "trainer",
        "resources": {"limits": {"cpu": "1500m", "memory": "2Gi"}},
        "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "CM_"}],
        "env": [
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "JOB", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['job-name']"}}},
            {"name": "NONE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['absent']"}}},
            {"name": "THREADS", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "threads"}}},
            {"name": "OPT", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "absent", "optional": True}}},
            {"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}}},
            {"name": "MEM_MI", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
        ],
    }
    env = resolve_env(container, pod_facts(), {"cm": {"data": {"threads": "2"}}})
    assert env == {
        "CM_threads": "2",
        "POD": "job-1-abcde",
        "NS": "ml",
        "IP": "10.244.0.3",
        "JOB": "job",
        "NONE": "",
        "THREADS": "2",
        "CPUS": "2",  # rounded up, as the kubelet does
        "MEM_MI": "2048",
    }


@pytest.mark.parametrize(
    ("text", "value"), [("2", 2), ("500m", 0.5), ("1.5", 1.5), ("256Mi", 256 * 2**20), ("1G", 10**9), ("3k", 3000)]
)
def test_quantities(text, value):
    assert quantity(text) == value


@pytest.mark.parametrize("text", ["1ki", "2 Gi", "-1", "1GB"])
def test_unreadable_quantities_are_refused(text):
    with pytest.raises(ManifestError):
        quantity(text)


def test_an_unset_request_reads_as_the_limit():
    container = {"name": "c", "resources": {"limits": {"cpu": "2"}}}
    ref = {"resourceFieldRef": {"resource": "requests.cpu"}}
    assert resolve_env({**container, "env": [{"name": "R", "valueFrom": ref}]}, pod_facts(), {}) == {"R": "2"}


@pytest.mark.parametrize(
    "var",
    [
        {"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
        {"name": "F", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeNam"}}},
        {"name": "K", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "absent"}}},
        {"name": "M", "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "k"}}},
    ],
    ids=["secret", "misspelled-field", "missing-key", "missing-configmap"],
)
def test_env_that_cannot_be_resolved_is_refused(var):
    with pytest.raises(ManifestError):
        resolve_env({"name": "c", "env": [var]}, pod_facts(), {"cm": {"data": {}}})


@pytest.mark.parametrize(
    ("container", "argv"),
    [
        ({}, ["/usr/bin/tini", "--", "python", "-m", "job", "train"]),
        ({"args": ["torchrun", "--node-rank=$(I)"]}, ["/usr/bin/tini", "--", "torchrun", "--node-rank=1"]),
        ({"command": ["python"]}, ["python"]),
        ({"command": ["sh", "-c"], "args": ["echo $$(I) $(I)"]}, ["sh", "-c", "echo $(I) 1"]),
    ],
    ids=["image-defaults", "args-replace-cmd", "command-drops-cmd", "both"],
)
def test_command_and_args_replace_entrypoint_and_cmd(container, argv):
    assert container_argv(container, IMAGE, {"I": "1"}) == argv


def test_the_image_config_is_read_from_the_dockerfile():
    assert IMAGE.env["PATH"].startswith("/opt/venv/bin:") and IMAGE.env["PATH"].endswith(":/usr/bin:/sbin:/bin")
    assert IMAGE.env["PYTHONPATH"] == "/app" and IMAGE.env["HOME"] == "/tmp"
    assert (IMAGE.workdir, IMAGE.uid, IMAGE.gid) == ("/app", 10001, 10001)
    assert IMAGE.entrypoint == ["/usr/bin/tini", "--"]


def test_the_pod_has_every_path_the_image_copies_in():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    final_stage = dockerfile[dockerfile.rindex("\nFROM ") :]
    copied = set(re.findall(r"^COPY --from=\S+ \S+ (\S+)$", final_stage, re.M))
    made = set(re.findall(r"mkdir -p (\S+)", final_stage))
    host = Host.of(REPO, data=Path("/data"))
    planned = {step.target for step in image_steps(IMAGE, host) if isinstance(step, Mount | Dir)}
    assert copied and made and copied | made <= planned


@pytest.fixture
def manifests() -> Manifests:
    return Manifests.parse(FIXTURE.read_text())


def plan(manifests: Manifests, index: int, tmp_path: Path):
    facts = manifests.pod_facts(index, "job-uid", f"10.244.0.{index + 2}", "10.244.0.1")
    dirs = HostDirs(shared=tmp_path / "shared", pod=tmp_path / facts.name)
    return facts, plan_pod(manifests, IMAGE, Host.of(REPO, data=tmp_path / "data"), facts, index, dirs)


def test_a_pod_of_an_indexed_job_as_the_job_controller_and_kubelet_make_it(manifests, tmp_path):
    facts, pod = plan(manifests, 1, tmp_path)
    assert re.fullmatch(r"mnist-ddp-1-[a-z0-9]{5}", pod.name) and pod.hostname == "mnist-ddp-1"
    assert facts.labels["job-name"] == "mnist-ddp" and facts.labels["batch.kubernetes.io/controller-uid"] == "job-uid"
    assert pod.env["JOB_COMPLETION_INDEX"] == "1" and pod.env["HOSTNAME"] == "mnist-ddp-1"
    assert pod.env["POD_IP"] == "10.244.0.3" and pod.env["OMP_NUM_THREADS"] == "1"
    assert pod.env["PYTHONPATH"] == "/app" and pod.env["PATH"].startswith("/opt/venv/bin:")
    assert pod.argv[:3] == ["/usr/bin/tini", "--", "torchrun"]
    assert "--rdzv-endpoint=mnist-ddp-0.mnist-ddp:29400" in pod.argv and "--local-addr=10.244.0.3" in pod.argv
    assert (pod.uid, pod.gid, pod.groups, pod.workdir) == (10001, 10001, [10001], "/app")
    assert pod.read_only_root and pod.no_new_privs
    mounts = {step.target: step for step in pod.steps if isinstance(step, Mount)}
    assert mounts["/runs"].source == str(tmp_path / "shared" / "pvc" / "mnist-ddp-runs")
    assert mounts["/etc/mnist-ddp"].read_only
    assert mounts["/dev/shm"].fstype == "tmpfs" and f"size={256 * 2**20}" in mounts["/dev/shm"].options
    assert mounts["/tmp"].source == str(tmp_path / facts.name / "emptydirs" / "tmp")


def test_job_completion_index_comes_last_in_the_env(manifests, tmp_path):
    """The Job controller appends it: args see it, other env values do not."""
    container = manifests.container()
    container["env"].append({"name": "RANK_DIR", "value": "/runs/$(JOB_COMPLETION_INDEX)"})
    container["args"].append("--index=$(JOB_COMPLETION_INDEX)")
    _, pod = plan(manifests, 1, tmp_path)
    assert pod.env["RANK_DIR"] == "/runs/$(JOB_COMPLETION_INDEX)"
    assert pod.argv[-1] == "--index=1"


def test_run_as_non_root_refuses_root(manifests, tmp_path):
    manifests.pod_spec["securityContext"]["runAsUser"] = 0
    with pytest.raises(ManifestError, match="runAsNonRoot"):
        plan(manifests, 0, tmp_path)


def test_dns_answers_the_names_cluster_dns_would(manifests):
    labels = manifests.pod_facts(0, "uid", "10.244.0.2", "10.244.0.1").labels
    names = manifests.dns_names(0, labels)
    for name in ("mnist-ddp-0.mnist-ddp", "mnist-ddp-0.mnist-ddp.ml", "mnist-ddp-0.mnist-ddp.ml.svc.cluster.local"):
        assert name in names
    assert "mnist-ddp" in names  # the headless Service: every selected pod's IP
    assert "mnist-ddp-0" not in names, "a bare hostname resolves only in its own pod"
    assert manifests.dns_names(0, {"job-name": "other"}) == [], "the Service does not select this pod"

    hosts = hosts_file(
        ("10.244.0.3", "mnist-ddp-1.mnist-ddp.ml.svc.cluster.local", "mnist-ddp-1"), {"10.244.0.2": names}
    )
    assert "10.244.0.3\tmnist-ddp-1.mnist-ddp.ml.svc.cluster.local\tmnist-ddp-1\n" in hosts
    assert "10.244.0.2\tmnist-ddp-0.mnist-ddp.ml.svc.cluster.local " in hosts


def test_a_pod_needs_a_headless_service_named_like_its_subdomain_for_its_record(manifests):
    manifests.pod_spec["subdomain"] = "elsewhere"
    assert not any(name.startswith("mnist-ddp-0.") for name in manifests.dns_names(0, {"job-name": "mnist-ddp"}))


@pytest.mark.parametrize(("code", "action"), [(2, "FailJob"), (75, "Ignore"), (1, "Count"), (137, "Count")])
def test_pod_failure_policy_exit_code_rules(code, action):
    policy = {
        "rules": [
            {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]}},
            {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [75]}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "FailJob", "onExitCodes": {"containerName": "sidecar", "operator": "NotIn", "values": [0]}},
        ]
    }
    assert failure_action(policy, "trainer", code) == action


@pytest.mark.parametrize(
    ("code", "conditions", "action"),
    [(None, ("DisruptionTarget",), "Ignore"), (2, ("DisruptionTarget",), "FailJob"), (None, (), "Count")],
    ids=["failed-by-podgc", "first-rule-first", "no-exit-code-no-condition"],
)
def test_pod_failure_policy_condition_rules(code, conditions, action):
    """A pod of a lost node, failed by the pod garbage collector, has DisruptionTarget and no exit
    code: only onPodConditions can match it; rules apply in order."""
    policy = {
        "rules": [
            {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }
    assert failure_action(policy, "trainer", code, conditions) == action


def test_pod_failure_policy_not_in_matches_every_other_exit_code():
    policy = {"rules": [{"action": "FailIndex", "onExitCodes": {"operator": "NotIn", "values": [1, 137]}}]}
    assert failure_action(policy, "trainer", 3) == "FailIndex"
    assert failure_action(policy, "trainer", 137) == "Count"
