"""The rendered manifests, and what the API server and the Job controller make of them: a pod's
name, labels and annotations, its hostname, and the DNS names cluster DNS gives it."""

from __future__ import annotations

import random
import string
import uuid
from dataclasses import dataclass

import yaml

CLUSTER_DOMAIN = "cluster.local"
NODE_NAME = "k8s-local"


class ManifestError(ValueError):
    """A manifest this runner cannot run as a cluster would (unsupported kind of value or volume)."""


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


def config_map_data(config_maps: dict[str, dict], ref: dict) -> dict[str, str]:
    """The data of the ConfigMap `ref` names (an absent optional one: none)."""
    if ref["name"] in config_maps:
        return config_maps[ref["name"]].get("data", {})
    if ref.get("optional"):
        return {}
    raise ManifestError(f"ConfigMap {ref['name']!r} is referenced but not in the rendered manifests")


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
