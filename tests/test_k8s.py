"""k8s/: the manifests render, validate against the Kubernetes versions we support, pass
checkov, and agree with each other, with the job's config and with its exit codes.

The tools come from .venv-k8s (k8s/requirements.txt: kubectl with kustomize, the schema
validator, the Kubeflow models) and .venv-lint (checkov), which conftest's k8s_venv and
lint_venv fixtures build with make when a test here is selected.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import subprocess
import urllib.parse
from pathlib import Path

import pytest
import yaml
from helpers import K8S_BIN, LINT_BIN, REPO, tool

from job.config import load_config, rank_batch_size
from job.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED

pytestmark = pytest.mark.usefixtures("k8s_venv")

# The oldest Kubernetes whose defaults run the Job: backoffLimitPerIndex, FailIndex and
# podReplacementPolicy are beta and on from 1.29 (podFailurePolicy from 1.26). The newest
# is the newest schema kubernetes-validate ships.
OLDEST, NEWEST = "1.29.0", "1.37.0"
KUSTOMIZATIONS = [
    "job/configs",
    "k8s/common",
    "k8s/base",
    "k8s/overlays/cpu",
    "k8s/overlays/gpu",
    "k8s/overlays/kubeflow-pytorchjob",
    "k8s/overlays/kubeflow-trainjob",
    "k8s/tensorboard",
]
JOB_OVERLAYS = ["k8s/base", "k8s/overlays/cpu", "k8s/overlays/gpu"]
KUBEFLOW_KINDS = {"PyTorchJob", "TrainJob"}
APP_DIR = Path("/app")  # docker/Dockerfile's WORKDIR: relative config paths start here
IMAGE_UID = 10001  # docker/Dockerfile's USER
CONFIG_DIR = "/etc/mnist-ddp/config"  # where the pods mount the ConfigMap of job/configs


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


@functools.cache
def render(path: str) -> tuple[dict, ...]:
    result = run([tool(K8S_BIN, "kubectl"), "kustomize", str(REPO / path)])
    assert result.returncode == 0, result.stderr
    return tuple(yaml.safe_load_all(result.stdout))


def one(docs: tuple[dict, ...], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def container(pod_spec: dict, name: str) -> dict:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def env_values(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def torchrun_flags(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """The torchrun flags (--name=value) after `torchrun`, and what follows `-m job train`."""
    rest = args[args.index("torchrun") + 1 :]
    module = rest.index("-m")
    flags = dict(flag.removeprefix("--").split("=", 1) for flag in rest[:module])
    assert rest[module : module + 3] == ["-m", "job", "train"], rest
    return flags, rest[module + 3 :]


def config_of(job_args: list[str]) -> tuple[str, list[str]]:
    """The config file `job train` reads from the mounted ConfigMap, and the overrides."""
    (config_arg,) = [a for a in job_args if a.startswith("--config=")]
    config_path = config_arg.removeprefix("--config=")
    assert config_path.startswith(CONFIG_DIR + "/"), config_path
    return config_path.removeprefix(CONFIG_DIR + "/"), [a for a in job_args if not a.startswith("--")]


def load_job_config(docs: tuple[dict, ...], file_name: str, overrides: list[str], tmp_path: Path):
    data = one(docs, "ConfigMap", configmap_name(docs, "mnist-ddp-config"))["data"]
    path = tmp_path / file_name
    path.write_text(data[file_name])
    return load_config(path, overrides)


def configmap_name(docs: tuple[dict, ...], prefix: str) -> str:
    (name,) = [
        d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(prefix)
    ]
    return name


# --- rendering and schemas --------------------------------------------------------------


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_kustomization_renders(path):
    assert render(path)


def render_with_component(component: str, tmp_path: Path) -> tuple[dict, ...]:
    """The cpu overlay with one of k8s/components, as an overlay that uses it would render."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    rel = os.path.relpath(REPO / "k8s", overlay)
    (overlay / "kustomization.yaml").write_text(
        f"resources: [{rel}/overlays/cpu]\ncomponents: [{rel}/components/{component}]\n"
    )
    result = run([tool(K8S_BIN, "kubectl"), "kustomize", str(overlay)])
    assert result.returncode == 0, result.stderr
    return tuple(yaml.safe_load_all(result.stdout))


def test_the_fetch_mnist_component_fetches_into_the_trainers_data_dir_before_it_starts(tmp_path):
    pod = one(render_with_component("fetch-mnist", tmp_path), "Job")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["args"] == ["python", "-m", "job", "data", "--root", "/app/data"]
    mounts = {m["name"]: m["mountPath"] for m in container(pod, "trainer")["volumeMounts"]}
    assert mounts["data"] == "/app/data" == {m["name"]: m["mountPath"] for m in init["volumeMounts"]}["data"]


def test_the_mlflow_tracking_component_turns_tracking_on_and_lets_the_pods_reach_the_server(tmp_path):
    docs = render_with_component("mlflow-tracking", tmp_path)
    trainer = container(one(docs, "Job")["spec"]["template"]["spec"], "trainer")
    _, job_args = torchrun_flags(trainer["args"])
    config_file, overrides = config_of(job_args)
    assert config_file == "$(JOB_CONFIG)"
    cfg = load_job_config(docs, env_values(trainer)["JOB_CONFIG"], overrides, tmp_path)
    assert cfg.tracking.mlflow is True and cfg.tracking.uri is None  # the URI from the environment
    uri_ref = next(e for e in trainer["env"] if e["name"] == "MLFLOW_TRACKING_URI")["valueFrom"]["configMapKeyRef"]
    tracking = one(docs, "ConfigMap", uri_ref["name"])
    assert tracking["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mnist-ddp"  # make delete finds it
    uri = urllib.parse.urlsplit(tracking["data"][uri_ref["key"]])
    assert uri.scheme in ("http", "https") and uri.username is None and uri.password is None
    # Credentials only from a Secret the user creates, never a value in a manifest.
    assert trainer["envFrom"] == [{"secretRef": {"name": "mnist-ddp-mlflow", "optional": True}}]
    assert not [e for e in trainer["env"] if re.search("PASSWORD|TOKEN|USERNAME", e["name"])]
    # The NetworkPolicy: what the cpu overlay allows, plus the server's pods on the URI's port.
    *kept, server = trainer_policy(docs)["egress"]
    assert kept == trainer_policy(render("k8s/overlays/cpu"))["egress"]
    assert server["ports"] == [{"protocol": "TCP", "port": uri.port}]
    assert [set(peer) for peer in server["to"]] == [{"namespaceSelector", "podSelector"}]
    result = validate(list(docs), NEWEST, tmp_path)
    assert result.returncode == 0 and "ERROR" not in result.stdout + result.stderr, result.stdout + result.stderr


def test_the_single_node_volume_component_makes_the_claim_read_write_once(tmp_path):
    claim = one(render_with_component("single-node-volume", tmp_path), "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def core_resources() -> list[dict]:
    return [d for path in KUSTOMIZATIONS for d in render(path) if d["kind"] not in KUBEFLOW_KINDS]


def validate(docs: list[dict], version: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "resources.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return run([tool(K8S_BIN, "kubernetes-validate"), "--strict", "--quiet", "-k", version, str(path)])


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_core_resources_validate_strictly(version, tmp_path):
    result = validate(core_resources(), version, tmp_path)
    assert result.returncode == 0 and "ERROR" not in result.stdout + result.stderr, result.stdout + result.stderr


def test_the_validator_catches_a_misspelled_field(tmp_path):
    job = json.loads(json.dumps(one(render("k8s/overlays/cpu"), "Job")))
    job["spec"]["backoffLimitPerIndx"] = job["spec"].pop("backoffLimitPerIndex")
    result = validate([job], NEWEST, tmp_path)
    assert result.returncode != 0 and "backoffLimitPerIndx" in result.stdout + result.stderr


# The Kubeflow models ignore unknown keys, so a resource is compared with its round trip
# through them: a misspelled or misplaced field is missing on the way back.
ROUND_TRIP = """
import json, sys
doc = json.load(sys.stdin)
if doc["kind"] == "PyTorchJob":
    from kubeflow.training import ApiClient
    class Response:
        data = json.dumps(doc)
    client = ApiClient()
    back = client.sanitize_for_serialization(client.deserialize(Response, "KubeflowOrgV1PyTorchJob"))
else:
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
    back = TrainerV1alpha1TrainJob.from_dict(doc).to_dict()
json.dump(back, sys.stdout)
"""


def round_trip(doc: dict) -> dict:
    result = run([tool(K8S_BIN, "python"), "-c", ROUND_TRIP], input=json.dumps(doc))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


KUBEFLOW = [("k8s/overlays/kubeflow-pytorchjob", "PyTorchJob"), ("k8s/overlays/kubeflow-trainjob", "TrainJob")]


@pytest.mark.parametrize(("path", "kind"), KUBEFLOW)
def test_kubeflow_resources_parse_with_the_kubeflow_models(path, kind):
    doc = one(render(path), kind)
    assert round_trip(doc) == doc


@pytest.mark.parametrize(("path", "kind", "typo"), [(*KUBEFLOW[0], "maxRestart"), (*KUBEFLOW[1], "numNode")])
def test_the_round_trip_catches_a_misspelled_kubeflow_field(path, kind, typo):
    doc = json.loads(json.dumps(one(render(path), kind)))
    section = doc["spec"]["elasticPolicy"] if kind == "PyTorchJob" else doc["spec"]["trainer"]
    section[typo] = section.pop(typo + "s")
    assert round_trip(doc) != doc


@pytest.mark.lint
@pytest.mark.usefixtures("lint_venv")
def test_checkov_finds_no_failed_check(tmp_path):
    # What gets applied: the overlays and TensorBoard (k8s/base has no image tag by design).
    for path in [p for p in KUSTOMIZATIONS if p.startswith(("k8s/overlays/", "k8s/tensorboard"))]:
        (tmp_path / (path.replace("/", "_") + ".yaml")).write_text(yaml.safe_dump_all(render(path)))
    # CKV_K8S_21 (default namespace): the manifests name none on purpose; the namespace is
    # chosen when submitting (make submit NAMESPACE=...), and pod 0's rendezvous name
    # resolves in whichever namespace the pods run. Every other skip is inline, with its reason.
    result = run([tool(LINT_BIN, "checkov"), "--skip-download", "--quiet", "--compact", "--framework", "kubernetes",
                  "--skip-check", "CKV_K8S_21", "-d", str(tmp_path)])  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Failed checks: 0" in result.stdout


# --- what the manifests must agree on --------------------------------------------------


@pytest.mark.parametrize("path", JOB_OVERLAYS)
def test_rendezvous_is_pod_0_of_the_job_under_the_headless_service(path):
    docs = render(path)
    job, service = one(docs, "Job"), one(docs, "Service")
    pod = job["spec"]["template"]
    trainer = container(pod["spec"], "trainer")
    flags, _ = torchrun_flags(trainer["args"])
    host, port = flags["rdzv-endpoint"].split(":")
    # <job>-0.<service>: pod 0's hostname under the Service named by its subdomain; no
    # namespace in it, so it resolves in the pods' own namespace.
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert "namespace" not in job["metadata"] and "namespace" not in service["metadata"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    pods, look_alike = trainer_pods(docs)
    assert selects({"matchLabels": service["spec"]["selector"]}, pods)
    assert not selects({"matchLabels": service["spec"]["selector"]}, look_alike), "the Job's own pods only"
    assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]
    assert flags["rdzv-backend"] == "c10d"
    # Pod 0 hosts the store (decided by the completion index, not by a DNS guess).
    assert 'case "$JOB_COMPLETION_INDEX" in 0) is_host=1' in trainer["args"][2]
    # One rendezvous per Job: its uid.
    assert flags["rdzv-id"] == "$(JOB_UID)"
    uid = next(e for e in trainer["env"] if e["name"] == "JOB_UID")
    assert uid["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/controller-uid']"
    assert int(flags["max-restarts"]) > 0
    assert env_values(trainer)["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"


@pytest.mark.parametrize("path", JOB_OVERLAYS)
def test_world_size_is_nodes_times_processes_and_splits_the_global_batch(path, tmp_path):
    docs = render(path)
    job = one(docs, "Job")
    trainer = container(job["spec"]["template"]["spec"], "trainer")
    env = env_values(trainer)
    flags, job_args = torchrun_flags(trainer["args"])
    nodes, procs = int(env["NNODES"]), int(env["NPROC_PER_NODE"])
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nodes
    assert flags["nnodes"] == "$(NNODES)" and flags["nproc-per-node"] == "$(NPROC_PER_NODE)"
    assert "node-rank" not in flags, "c10d assigns node ranks; torchrun ignores --node-rank but for static"
    gpus = trainer["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus is None or int(gpus) == procs, "one process per GPU"
    config_file, overrides = config_of(job_args)
    assert config_file == "$(JOB_CONFIG)"
    cfg = load_job_config(docs, env["JOB_CONFIG"], overrides, tmp_path)
    assert rank_batch_size(cfg.data.global_batch_size, nodes * procs) * nodes * procs == cfg.data.global_batch_size
    assert cfg.data.download is False, "MNIST comes with the image (or the fetch-mnist init container)"
    if gpus:
        assert cfg.dist.device == "cuda", "GPUs asked for and not usable must be exit 2, not a CPU run"


@pytest.mark.parametrize("path", JOB_OVERLAYS)
def test_failure_policy_exit_codes_are_the_jobs(path):
    job = one(render(path), "Job")
    spec = job["spec"]
    rules = spec["podFailurePolicy"]["rules"]
    by_code = {
        code: rule["action"] for rule in rules if "onExitCodes" in rule for code in rule["onExitCodes"]["values"]
    }
    assert by_code == {EXIT_BAD_INPUT: "FailJob", EXIT_PREEMPTED: "Ignore"}
    assert all(r["onExitCodes"]["containerName"] == "trainer" for r in rules if "onExitCodes" in r)
    conditions = [r for r in rules if "onPodConditions" in r]
    assert [(r["action"], r["onPodConditions"]) for r in conditions] == [
        ("Ignore", [{"type": "DisruptionTarget", "status": "True"}])
    ]
    assert spec["backoffLimitPerIndex"] > 0 and spec["maxFailedIndexes"] == 0
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] > 0
    # torchrun gives its workers 30 s to exit after SIGTERM; the pod must outlive that.
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] > 30


# The label each controller puts on the pods it creates, valued with the name of the object
# it creates them for; no pod of the namespace carries it unless that controller made it
# for this job (or someone sets it by hand). Sources: Kubernetes
# staging/src/k8s.io/api/batch/v1/types.go (JobNameLabel); Training Operator
# pkg/controller.v1/common/job_controller.go GenLabels, used by createNewPod in pod.go;
# JobSet pkg/controllers/jobset_controller.go labelAndAnnotateObject (on each child Job's
# pod template), with Trainer pkg/runtime/framework/plugins/jobset/jobset.go naming the
# JobSet after the TrainJob.
JOB_NAME_LABEL = {
    "Job": "batch.kubernetes.io/job-name",
    "PyTorchJob": "training.kubeflow.org/job-name",
    "TrainJob": "jobset.sigs.k8s.io/jobset-name",
}
VARIANTS = [*JOB_OVERLAYS, *(path for path, _ in KUBEFLOW)]
DNS_RULE = {
    "to": [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ],
    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
}


def trainer_pods(docs: tuple[dict, ...]) -> tuple[dict[str, str], dict[str, str]]:
    """The labels the job's training pods run with (the template's, and the controller's
    job-name label), and those of another pod of the namespace that copies the others."""
    (owner,) = [d for d in docs if d["kind"] in JOB_NAME_LABEL]
    ((template, _),) = pod_templates(docs)
    label, name = JOB_NAME_LABEL[owner["kind"]], owner["metadata"]["name"]
    labels = template["metadata"]["labels"]
    # A template may say it (the Job's does), but only with the value the controller sets.
    assert labels.get(label, name) == name
    return {**labels, label: name}, {k: v for k, v in labels.items() if k != label}


def selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, selector
    return selector["matchLabels"].items() <= labels.items()


def trainer_policy(docs: tuple[dict, ...]) -> dict:
    return one(docs, "NetworkPolicy", "mnist-ddp")["spec"]


@pytest.mark.parametrize("path", VARIANTS)
def test_the_network_policy_selects_the_jobs_own_pods_by_the_jobs_name(path):
    docs = render(path)
    pods, look_alike = trainer_pods(docs)
    policy = trainer_policy(docs)
    (rule,) = policy["ingress"]
    (peer,) = rule["from"]
    for selector in (policy["podSelector"], peer["podSelector"]):
        assert selects(selector, pods) and not selects(selector, look_alike), selector
    (own, _dns) = policy["egress"]
    (own_peer,) = own["to"]
    assert peer == own_peer == {"podSelector": policy["podSelector"]}
    # No port list: the rendezvous port, the workers' store and gloo/NCCL use ephemeral ports.
    assert "ports" not in rule and "ports" not in own


@pytest.mark.parametrize("path", VARIANTS)
def test_the_trainers_reach_only_cluster_dns_and_each_other(path):
    policy = trainer_policy(render(path))
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    assert policy["egress"] == [{"to": [{"podSelector": policy["podSelector"]}]}, DNS_RULE]


def test_the_fetch_mnist_component_adds_https_out_but_not_to_metadata_or_cluster_addresses(tmp_path):
    docs = render_with_component("fetch-mnist", tmp_path)
    policy = trainer_policy(docs)
    *kept, https = policy["egress"]
    assert kept == trainer_policy(render("k8s/overlays/cpu"))["egress"]
    assert https["ports"] == [{"protocol": "TCP", "port": 443}]
    ((peer_kind, block),) = [item for peer in https["to"] for item in peer.items()]
    assert peer_kind == "ipBlock" and block["cidr"] == "0.0.0.0/0"
    excepted = [ipaddress.ip_network(cidr) for cidr in block["except"]]
    # Link-local (the clouds' metadata service, NodeLocal DNSCache), the private ranges where
    # pods, Services and nodes are on most clusters, shared address space (some clusters'
    # pods; Alibaba Cloud's metadata service).
    for cidr in ["169.254.0.0/16", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"]:
        assert any(ipaddress.ip_network(cidr).subnet_of(net) for net in excepted), cidr
    # ...and nothing of the public internet (registry.npmjs.org, the torchvision mirror's S3).
    assert all(net.is_private or net.subnet_of(ipaddress.ip_network("100.64.0.0/10")) for net in excepted)
    for version in (OLDEST, NEWEST):
        result = validate([one(docs, "NetworkPolicy", "mnist-ddp")], version, tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr


def test_tensorboard_admits_nothing_and_reaches_nothing():
    docs = render("k8s/tensorboard")
    policy = one(docs, "NetworkPolicy")["spec"]
    deployment = one(docs, "Deployment")["spec"]
    assert policy["podSelector"] == deployment["selector"]
    assert selects(policy["podSelector"], deployment["template"]["metadata"]["labels"])
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    assert not policy.get("ingress") and not policy.get("egress")


@pytest.mark.parametrize("path", [*VARIANTS, "k8s/tensorboard"])
def test_no_pod_mounts_a_service_account_token(path):
    docs = render(path)
    templates = pod_templates(docs)
    assert templates
    for template, _ in templates:
        pod = template["spec"]
        # The pod's own setting wins; without one, its service account's applies (a TrainJob's
        # runtimePatches can name an account but cannot set the field).
        if "automountServiceAccountToken" in pod:
            assert pod["automountServiceAccountToken"] is False
        else:
            account = one(docs, "ServiceAccount", pod.get("serviceAccountName", "default"))
            assert account["automountServiceAccountToken"] is False


def pod_templates(docs: tuple[dict, ...]) -> list[tuple[dict, str]]:
    """Every pod template in a render, with the name of its main container."""
    templates = []
    for d in docs:
        if d["kind"] == "Deployment":
            templates.append((d["spec"]["template"], d["spec"]["template"]["spec"]["containers"][0]["name"]))
        elif d["kind"] == "Job":
            templates.append((d["spec"]["template"], "trainer"))
        elif d["kind"] == "PyTorchJob":
            templates.append((d["spec"]["pytorchReplicaSpecs"]["Worker"]["template"], "pytorch"))
        elif d["kind"] == "TrainJob":
            (patch,) = d["spec"]["runtimePatches"]
            (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
            templates.append((node["template"]["spec"]["template"], "node"))
    return templates


@pytest.mark.parametrize("path", [*JOB_OVERLAYS, "k8s/overlays/kubeflow-pytorchjob"])
def test_run_directory_is_on_the_shared_volume_and_pods_are_hardened(path, tmp_path):
    docs = render(path)
    ((template, name),) = pod_templates(docs)
    pod = template["spec"]
    trainer = container(pod, name)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in trainer["volumeMounts"]}
    args = trainer.get("args") or trainer["command"]
    config_file, overrides = config_of(args[args.index("train") + 1 :])
    config_file = env_values(trainer).get("JOB_CONFIG", config_file)
    run_dir = APP_DIR / load_job_config(docs, config_file, overrides, tmp_path).run_dir
    runs = volumes[mounts["/app/runs"]]
    assert run_dir.parent == Path("/app/runs")
    claim = one(docs, "PersistentVolumeClaim", runs["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["sizeLimit"]
    assert "emptyDir" in volumes[mounts["/tmp"]]
    # Generated ConfigMaps carry a content hash: every reference must be the rewritten name.
    names = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    assert {v["configMap"]["name"] for v in volumes.values() if "configMap" in v} <= names
    pod_security, security = pod["securityContext"], trainer["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == pod_security["runAsGroup"] == pod_security["fsGroup"] == IMAGE_UID
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert security == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["automountServiceAccountToken"] is False
    assert trainer["resources"]["requests"] and trainer["resources"]["limits"]
    assert f"USER {IMAGE_UID}:{IMAGE_UID}" in (REPO / "docker/Dockerfile").read_text()


def test_the_configmap_holds_job_configs_unchanged():
    data = one(render("k8s/base"), "ConfigMap", configmap_name(render("k8s/base"), "mnist-ddp-config"))["data"]
    on_disk = {p.name: p.read_text() for p in (REPO / "job/configs").glob("*.yaml") if p.name != "kustomization.yaml"}
    assert data == on_disk


def test_the_pytorchjob_is_elastic_over_world_sizes_that_split_the_batch(tmp_path):
    docs = render("k8s/overlays/kubeflow-pytorchjob")
    spec = one(docs, "PyTorchJob")["spec"]
    elastic = spec["elasticPolicy"]
    assert elastic["rdzvBackend"] == "c10d" and elastic["maxRestarts"] > 0
    replicas = spec["pytorchReplicaSpecs"]["Worker"]["replicas"]
    assert elastic["minReplicas"] <= replicas <= elastic["maxReplicas"]
    pod = spec["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    command = container(pod, "pytorch")["command"]
    assert command[:5] == ["/usr/bin/tini", "--", "python", "-m", "job.launch"]
    _, overrides = config_of(command[command.index("train") + 1 :])
    cfg = load_job_config(docs, "default.yaml", overrides, tmp_path)
    for nodes in range(elastic["minReplicas"], elastic["maxReplicas"] + 1):
        rank_batch_size(cfg.data.global_batch_size, nodes * int(spec["nprocPerNode"]))


def test_the_trainjob_runs_the_launcher_on_the_torch_runtime(tmp_path):
    docs = render("k8s/overlays/kubeflow-trainjob")
    spec = one(docs, "TrainJob")["spec"]
    trainer = spec["trainer"]
    assert spec["runtimeRef"]["name"] == "torch-distributed"
    assert trainer["command"][:5] == ["/usr/bin/tini", "--", "python", "-m", "job.launch"]
    command = trainer["command"]
    _, overrides = config_of(command[command.index("train") + 1 :])
    cfg = load_job_config(docs, "default.yaml", overrides, tmp_path)
    rank_batch_size(cfg.data.global_batch_size, trainer["numNodes"] * trainer["numProcPerNode"])
    (patch,) = spec["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    names = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    assert {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v} <= names
    assert {m["mountPath"] for m in container(pod, "node")["volumeMounts"]} >= {"/app/runs", "/dev/shm", "/tmp"}
