"""Kubernetes manifests of a training run (`phalanx k8s manifest`): pure functions from a `K8sRun` to dicts.

Two ways to run the same pods, each pod one Phalanx launcher (`phalanx train --nproc K`) that starts its ranks
through PyTorch's elastic agent and meets the other pods at a c10d rendezvous hosted by the first pod:
- a PyTorchJob (Kubeflow training-operator, kubeflow.org/v1): a Master (the rendezvous host) and REPLICAS-1
  Workers; the operator makes a Service per pod, so the endpoint is NAME-master-0:PORT;
- an Indexed Job (batch/v1, completionMode Indexed) with a headless Service of the same name: pod K is
  NAME-K.NAME, so the endpoint is NAME-0.NAME:PORT; nothing beyond Kubernetes itself is needed.
The rendezvous id is the job name; the run directory lies on a volume (a PersistentVolumeClaim, ReadWriteMany
for several pods) shared by every pod and every pod that replaces one, so a replaced pod resumes from it.

On SIGTERM (a preemption, a drained node) each launcher passes the signal to its ranks, which finish their step
and write a checkpoint: terminationGracePeriodSeconds must cover that. A run stopped before its end exits 143
(its checkpoint written), so that Kubernetes counts the pod as failed and replaces it; a user's mistake (exit 2)
fails the job at once; a finished run exits 0.

Nothing here talks to a cluster: these are the manifests, written as YAML by `to_yaml`.
"""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field

NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
NAME_MAX = 50
"""A job name is a DNS label; pods and Services add `-master-0` or `-K` (at most 63 characters in all)."""

CONTAINER = "phalanx"
USER_ERROR_EXIT = 2
"""Phalanx's exit code for a user's mistake (a ConfigError): retrying cannot help."""
STOPPED_EXIT = 143
"""What a pod whose run was stopped before its end (SIGTERM, its checkpoint written) exits with: 128 + SIGTERM."""
DNS_WAIT_S = 300
"""How long a pod waits for the rendezvous host's DNS name (it appears once that pod has an address)."""


@dataclass(frozen=True)
class Volume:
    """A PersistentVolumeClaim mounted in every pod."""
    claim: str
    mount: str
    read_only: bool = False


@dataclass(frozen=True)
class K8sRun:
    """One training run on Kubernetes: its pods, what each runs, and where the run directory lives."""
    name: str
    """The job's name: also the rendezvous id, and the headless Service's name."""
    image: str
    run_dir: str
    """Inside the containers, on `volume`."""
    volume: Volume
    replicas: int = 1
    """Pods (nodes): one Phalanx launcher each."""
    nproc: str = "auto"
    """Ranks per pod (`phalanx train --nproc`)."""
    train_args: tuple[str, ...] = ()
    """The user's own `phalanx train` options."""
    gpus: int = 0
    """GPUs per pod (the nvidia.com/gpu resource)."""
    cpus: str = ""
    memory: str = ""
    max_restarts: int = 3
    """Failures the run recovers from: the elastic agent's restarts of a pod's ranks, and the pods Kubernetes
    replaces (backoffLimit)."""
    grace_s: int = 120
    """terminationGracePeriodSeconds: a step and a checkpoint write must fit."""
    port: int = 29400
    namespace: str = ""
    data_volume: Volume | None = None
    labels: dict = field(default_factory=dict)


def endpoint(run: K8sRun, kind: str) -> str:
    """HOST:PORT of the c10d rendezvous: the first pod's DNS name (PyTorchJob: its Master's Service; Indexed Job:
    pod 0 under the headless Service)."""
    host = f"{run.name}-master-0" if kind == "PyTorchJob" else f"{run.name}-0.{run.name}"
    return f"{host}:{run.port}"


def train_argv(run: K8sRun, kind: str) -> list[str]:
    """`phalanx train` with the run's layout, then the user's options (which never repeat the layout)."""
    argv = ["phalanx", "train", "--run_dir", run.run_dir, "--nproc", run.nproc,
            "--parallel.max_restarts", str(run.max_restarts)]
    if run.replicas > 1:
        argv += ["--parallel.nnodes", str(run.replicas), "--parallel.rdzv_endpoint", endpoint(run, kind),
                 "--parallel.rdzv_id", run.name]
    return argv + list(run.train_args)


def pod_script(run: K8sRun, kind: str) -> str:
    """The container's shell script: wait for the rendezvous host's name (bounded), run `phalanx train` with
    SIGTERM passed on, and turn a stop before the end into exit 143 (the pod is replaced and resumes)."""
    lines = ["set -u"]
    if kind == "PyTorchJob":
        lines += ["# the operator's RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT describe one process per pod; the",
                  "# elastic agent gives each rank its own",
                  "unset RANK WORLD_SIZE MASTER_ADDR MASTER_PORT"]
    if run.replicas > 1:
        host = endpoint(run, kind).rsplit(":", 1)[0]
        lines += [f"# {host} has a DNS name once its pod has an address: wait for it (at most {DNS_WAIT_S} s)",
                  f"i=0; until python3 -c 'import socket, sys; socket.getaddrinfo(sys.argv[1], None)' {host} "
                  f"2>/dev/null || [ $i -ge {DNS_WAIT_S} ]; do i=$((i + 1)); sleep 1; done"]
    model = shlex.quote(f"{run.run_dir}/model.safetensors")
    lines += ["trap 'kill -TERM \"$PID\" 2>/dev/null' TERM",
              shlex.join(train_argv(run, kind)) + " &",
              "PID=$!",
              "wait \"$PID\"; STATUS=$?",
              "while kill -0 \"$PID\" 2>/dev/null; do wait \"$PID\"; STATUS=$?; done  # a trap ends `wait` early",
              "# stopped before its end (its checkpoint written): fail the pod, so that it is replaced and resumes",
              f"if [ \"$STATUS\" = 0 ] && [ ! -e {model} ]; then STATUS={STOPPED_EXIT}; fi",
              "exit \"$STATUS\""]
    return "\n".join(lines) + "\n"


def container(run: K8sRun, kind: str) -> dict:
    mounts = [{"name": "run", "mountPath": run.volume.mount}, {"name": "dshm", "mountPath": "/dev/shm"}]
    if run.data_volume is not None:
        mounts.append({"name": "data", "mountPath": run.data_volume.mount, "readOnly": run.data_volume.read_only})
    c = {"name": CONTAINER, "image": run.image, "command": ["/bin/sh", "-c", pod_script(run, kind)],
         "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}], "volumeMounts": mounts}
    if run.replicas > 1:
        c["ports"] = [{"name": "rdzv", "containerPort": run.port}]
    limits = {}
    if run.gpus:
        limits["nvidia.com/gpu"] = run.gpus
    requests = {k: v for k, v in (("cpu", run.cpus), ("memory", run.memory)) if v}
    if requests or limits:
        c["resources"] = {k: v for k, v in (("requests", requests), ("limits", limits)) if v}
    return c


def pod_spec(run: K8sRun, kind: str, restart_policy: str) -> dict:
    volumes = [{"name": "run", "persistentVolumeClaim": {"claimName": run.volume.claim}},
               # ranks share memory (pinned batches, snapshots): the container runtime's 64 MB /dev/shm is too small
               {"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    if run.data_volume is not None:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": run.data_volume.claim,
                                                                  "readOnly": run.data_volume.read_only}})
    return {"restartPolicy": restart_policy, "terminationGracePeriodSeconds": run.grace_s,
            "containers": [container(run, kind)], "volumes": volumes}


def _metadata(run: K8sRun, name: str | None = None) -> dict:
    meta = {"name": name or run.name, "labels": {"app.kubernetes.io/name": "phalanx", **run.labels}}
    if run.namespace:
        meta["namespace"] = run.namespace
    return meta


def pytorchjob(run: K8sRun) -> dict:
    """A Kubeflow PyTorchJob: Master (pod 0, the rendezvous host) and REPLICAS-1 Workers. restartPolicy ExitCode:
    the operator restarts a pod that exited with 128+N (killed, or stopped before its end) and fails one that
    exited 1-127 (a user's mistake, or a failure the elastic agent already retried)."""
    kind = "PyTorchJob"
    template = {"metadata": {"labels": {"app.kubernetes.io/name": "phalanx"}},
                "spec": pod_spec(run, kind, "ExitCode")}
    specs = {"Master": {"replicas": 1, "restartPolicy": "ExitCode", "template": template}}
    if run.replicas > 1:
        specs["Worker"] = {"replicas": run.replicas - 1, "restartPolicy": "ExitCode", "template": template}
    return {"apiVersion": "kubeflow.org/v1", "kind": kind, "metadata": _metadata(run),
            "spec": {"runPolicy": {"backoffLimit": run.max_restarts, "cleanPodPolicy": "None"},
                     "pytorchReplicaSpecs": specs}}


def headless_service(run: K8sRun) -> dict:
    """The Service that gives each pod of the Indexed Job a DNS name (NAME-K.NAME), before it is ready."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(run),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {"job-name": run.name},
                     "ports": [{"name": "rdzv", "port": run.port, "targetPort": run.port}]}}


def indexed_job(run: K8sRun) -> dict:
    """A batch/v1 Job of REPLICAS pods, one per index, under the headless Service. restartPolicy Never with a
    podFailurePolicy: a user's mistake (exit 2) fails the job, a pod disrupted by Kubernetes (preemption,
    eviction) is replaced without counting, any other failure is replaced up to backoffLimit times."""
    kind = "Job"
    spec = pod_spec(run, kind, "Never")
    spec["subdomain"] = run.name
    return {"apiVersion": "batch/v1", "kind": kind, "metadata": _metadata(run),
            "spec": {"completionMode": "Indexed", "completions": run.replicas, "parallelism": run.replicas,
                     "backoffLimit": run.max_restarts,
                     "podFailurePolicy": {"rules": [
                         {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                                "values": [USER_ERROR_EXIT]}},
                         {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]},
                     "template": {"metadata": {"labels": {"app.kubernetes.io/name": "phalanx"}}, "spec": spec}}}


def manifests(run: K8sRun) -> dict[str, list[dict]]:
    """File name -> the documents it holds."""
    return {"pytorchjob.yaml": [pytorchjob(run)], "indexed-job.yaml": [headless_service(run), indexed_job(run)]}


def to_yaml(docs: list[dict]) -> str:
    """YAML documents (a small subset: mappings, lists, strings, numbers, booleans), `---` between them. Strings
    are double-quoted as JSON writes them (valid YAML), scripts as literal blocks."""
    return "---\n".join(_node(d, 0) for d in docs)


def _scalar(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return json.dumps(v)
    return json.dumps(str(v), ensure_ascii=False)


def _block(s: str) -> bool:
    """A multi-line string written as a literal block: exactly representable (no trailing blanks, no tabs)."""
    lines = s.split("\n")
    return ("\n" in s and s.endswith("\n") and not s.endswith("\n\n") and not s[:1].isspace()
            and all(ln == ln.rstrip() and "\t" not in ln for ln in lines))


def _node(v, indent: int) -> str:
    pad = " " * indent
    if isinstance(v, dict):
        if not v:
            return pad + "{}\n"
        out = []
        for k, x in v.items():
            out.append(pad + _key(k) + ":" + _after(x, indent))
        return "".join(out)
    if isinstance(v, list):
        if not v:
            return pad + "[]\n"
        out = []
        for x in v:
            if isinstance(x, dict) and x:
                body = _node(x, indent + 2)
                out.append(pad + "- " + body[indent + 2:])
            else:
                out.append(pad + "-" + _after(x, indent))
        return "".join(out)
    return pad + _scalar(v) + "\n"


def _after(x, indent: int) -> str:
    """What follows `key:` or `-`: a scalar on the same line, or a nested block on the next."""
    if isinstance(x, (dict, list)) and x:
        return "\n" + _node(x, indent + 2)
    if isinstance(x, str) and _block(x):
        inner = " " * (indent + 2)
        return " |\n" + "".join(inner + ln + "\n" if ln else "\n" for ln in x[:-1].split("\n"))
    return " " + (_node(x, 0).strip() if isinstance(x, (dict, list)) else _scalar(x)) + "\n"


def _key(k) -> str:
    k = str(k)
    return k if re.fullmatch(r"[A-Za-z_][\w.\-/]*", k) else json.dumps(k)
