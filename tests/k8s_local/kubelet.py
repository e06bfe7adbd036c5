"""The kubelet's rules, pure: `$(VAR)` expansion; env from value, fieldRef, resourceFieldRef and
configMapKeyRef; quantities; command and args over the image's ENTRYPOINT and CMD; /etc/hosts."""

from __future__ import annotations

import math
import os
import re

from .image import ImageConfig
from .manifests import ManifestError, PodFacts, config_map_data


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
        data = config_map_data(config_maps, source["configMapRef"])
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
            data = config_map_data(config_maps, ref)
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


def container_argv(container: dict, image: ImageConfig, env: dict[str, str]) -> list[str]:
    """`command` replaces the image's ENTRYPOINT and drops its CMD; `args` replaces CMD; only the
    manifest's own words are `$(VAR)`-expanded (with the container env, not the image's)."""
    command = [expand(word, env) for word in container.get("command", [])]
    args = [expand(word, env) for word in container.get("args", [])]
    if command:
        return command + args
    return image.entrypoint + (args if "args" in container else image.cmd)


def hosts_file(own: tuple[str, str, str], records: dict[str, list[str]]) -> str:
    """A pod's /etc/hosts: the kubelet's lines (localhost; this pod's IP, FQDN, hostname) and the
    names cluster DNS would answer: {ip: names}."""
    ip, fqdn, hostname = own
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", f"{ip}\t{fqdn}\t{hostname}"]
    lines += [f"{addr}\t{' '.join(names)}" for addr, names in records.items() if names]
    return "\n".join(lines) + "\n"
