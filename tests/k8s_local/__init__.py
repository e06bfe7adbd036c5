"""Run a rendered Kubernetes Job on this machine the way a cluster would: one process tree per pod.

    manifests = Manifests.parse(subprocess.check_output(["kubectl", "kustomize", "k8s/base"], text=True))
    with LocalJob(manifests, Host.of(REPO, data=tiny_mnist), work=tmp_path) as job:
        job.start()
        job.wait(timeout=300)

One module per stage; each imports only the ones listed before it:
- image.py (pure): the image's config from docker/Dockerfile's final stage (ENV, WORKDIR, USER,
  ENTRYPOINT, CMD) and the host files that stand in for its content (checkout, .venv, data);
- manifests.py (pure): the rendered objects, and what the API server and the Job controller
  make of them: a pod's name, labels, annotations, hostname and cluster DNS names;
- kubelet.py (pure): the kubelet's rules: `$(VAR)` expansion, env from value/fieldRef/
  resourceFieldRef/configMapKeyRef, quantities, command vs ENTRYPOINT, /etc/hosts;
- plan.py (pure): what one pod of a completion index is: hostname, env, argv, user and groups
  from the securityContext, and its root filesystem as a list of steps (the image's files, the
  kubelet's /etc files, the volumes);
- pod.py (root, run as `python -m k8s_local.pod enter PLAN` inside the pod's namespaces): builds
  the root filesystem, chroots, drops to the pod's user, execs the container command;
- network.py (root): a bridge namespace with a veth to each pod's network namespace, and the
  removal of what a crashed run left;
- controller.py (root): the Job controller: pods started per index, failed ones replaced as the
  Job controller does, podFailurePolicy, backoff limits, activeDeadlineSeconds; a lost node (its
  pod frozen, failed with DisruptionTarget as the pod garbage collector does, replaced). Each pod
  runs as on a node of its own: its own boot id over /proc/sys/kernel/random/boot_id.

Not emulated: the image itself (its files come from this checkout and .venv, its OS from this
machine's /usr and /etc; `make image-test` runs the real image), the API server, the scheduler,
resource limits, probes, seccomp, NetworkPolicy, Secrets. Cluster DNS is a hosts file per pod
listing exactly the names cluster DNS would answer from that pod, updated as pods come and go.

Needs root, iproute2 (`ip`), util-linux (`unshare`, `mount`) and the image's ENTRYPOINT (tini).
"""
