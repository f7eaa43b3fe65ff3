"""`phalanx k8s manifest`: Kubernetes manifests of a training run (runtime/k8s.py), written into a folder.

Two files: pytorchjob.yaml (Kubeflow's training-operator) and indexed-job.yaml (a headless Service and an
Indexed Job: Kubernetes alone). Apply one of them with `kubectl apply -f`. The options after `--` are those of
`phalanx train`, checked here as `phalanx train` checks them before it writes anything.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from phalanx import config as C
from phalanx.commands.args import Command, Option, Parsed, Spec, parse, run_group
from phalanx.commands.train import COMMANDS as TRAIN
from phalanx.errors import ConfigError
from phalanx.paths import check_destination
from phalanx.runtime import k8s

OPTIONS = (
    Option("name", "the job's name (a DNS label: a-z, 0-9, -): the rendezvous id and the Service's name too", str,
           "phalanx"),
    Option("image", "the container image (Phalanx and its dependencies installed; `phalanx` on PATH)", str, None,
           metavar="IMAGE"),
    Option("volume", "CLAIM:MOUNT, the PersistentVolumeClaim the run directory lies on (ReadWriteMany for several "
           "replicas)", str, None, metavar="CLAIM:MOUNT"),
    Option("run_dir", "the run directory inside the containers, under the volume's MOUNT", str, None, metavar="DIR"),
    Option("replicas", "pods (nodes): one Phalanx launcher each", int, 1, minimum=1),
    Option("nproc", "ranks per pod, handed to `phalanx train --nproc` (auto: one per GPU)", str, "auto"),
    Option("gpus", "GPUs per pod (nvidia.com/gpu; 0: none asked for)", int, 0, minimum=0),
    Option("cpus", "CPU request per pod (e.g. 8; empty: none)", str, ""),
    Option("memory", "memory request per pod (e.g. 32Gi; empty: none)", str, ""),
    Option("data_volume", "CLAIM:MOUNT of a read-only PersistentVolumeClaim holding the data (optional)", str, ""),
    Option("max_restarts", "failures the run recovers from: the elastic agent's restarts in a pod, and the pods "
           "Kubernetes replaces (backoffLimit)", int, 3, minimum=0),
    Option("grace_s", "terminationGracePeriodSeconds: SIGTERM to exit, a step and a checkpoint write must fit",
           int, 120, minimum=10),
    Option("port", "the rendezvous port on the first pod", int, 29400, minimum=1),
    Option("namespace", "the namespace (empty: kubectl's current one)", str, ""),
    Option("out", "the folder the two manifests are written into", Path, None, metavar="DIR"),
)
ABOUT = ("Write the Kubernetes manifests of `phalanx train` with the options after `--`: a Kubeflow PyTorchJob "
         "(pytorchjob.yaml) and an Indexed Job with its headless Service (indexed-job.yaml), REPLICAS pods of NPROC "
         "ranks meeting at a c10d rendezvous on the first pod, the run directory on a volume.")
EPILOG = """example:
  phalanx k8s manifest --image registry.example/phalanx:0.1 --volume runs:/runs --run_dir /runs/r50 --replicas 2 --nproc 8 --gpus 8 --data_volume imagenet:/data --out k8s/ -- --recipe imagefolder_224 --data /data/imagenet

No cluster was reachable where these were written and tested: the tests check every field, not a real run."""

TAKEN = {"parallel.nproc": "--nproc", "parallel.nnodes": "--replicas", "parallel.node_rank": "--replicas",
         "parallel.rdzv_endpoint": "--port", "parallel.rdzv_id": "--name", "parallel.max_restarts": "--max_restarts",
         "run_dir": "--run_dir"}
"""Options of `phalanx train` that the manifest decides, and the option of `phalanx k8s manifest` that says it."""


def _volume(text: str, option: str, read_only: bool = False) -> k8s.Volume:
    claim, _, mount = text.partition(":")
    if not (k8s.NAME.fullmatch(claim) and mount.startswith("/")):
        raise ConfigError(f"{option} {text!r}: give CLAIM:MOUNT, a PersistentVolumeClaim's name and an absolute "
                          f"path in the container, e.g. {option} runs:/runs")
    return k8s.Volume(claim, mount.rstrip("/") or "/", read_only)


def run_of(p: Parsed) -> k8s.K8sRun:
    """The run `p` describes, every value checked (one ConfigError line)."""
    v = p.values
    for opt in ("image", "volume", "run_dir", "out"):
        if getattr(v, opt) in (None, ""):
            raise ConfigError(f"--{opt} is required (phalanx k8s manifest --help)")
    if not (k8s.NAME.fullmatch(v.name) and len(v.name) <= k8s.NAME_MAX):
        raise ConfigError(f"--name {v.name!r}: a DNS label of at most {k8s.NAME_MAX} characters (a-z, 0-9 and -, "
                          f"starting with a letter): pods and Services are named after it")
    if not (v.nproc == "auto" or (v.nproc.isdecimal() and 1 <= int(v.nproc) <= 4096)):
        raise ConfigError(f"--nproc {v.nproc}: a number of ranks per pod, or auto")
    if v.namespace and not (k8s.NAME.fullmatch(v.namespace) and len(v.namespace) <= 63):
        raise ConfigError(f"--namespace {v.namespace!r}: a DNS label (a-z, 0-9 and -, starting with a letter)")
    if v.port > 65535:
        raise ConfigError(f"--port {v.port}: a TCP port from 1 to 65535")
    volume = _volume(v.volume, "--volume")
    run_dir = PurePosixPath(v.run_dir)
    if not (run_dir.is_absolute() and PurePosixPath(volume.mount) in run_dir.parents):
        raise ConfigError(f"--run_dir {v.run_dir}: must lie under the volume's mount {volume.mount} (every pod, and "
                          f"every pod that replaces one, resumes from it), e.g. --run_dir {volume.mount}/{v.name}")
    data = _volume(v.data_volume, "--data_volume", read_only=True) if v.data_volume else None
    return k8s.K8sRun(name=v.name, image=v.image, run_dir=str(run_dir), volume=volume, replicas=v.replicas,
                      nproc=v.nproc, train_args=tuple(train_options(p)), gpus=v.gpus, cpus=v.cpus, memory=v.memory,
                      max_restarts=v.max_restarts, grace_s=v.grace_s, port=v.port, namespace=v.namespace,
                      data_volume=data)


def train_options(p: Parsed) -> list[str]:
    """The `phalanx train` options after `--`, checked as `phalanx train` checks them (its config built); one line
    for those the manifest decides."""
    own = parse("train", TRAIN["train"].spec, p.extra)
    for key in (C.canonical_key(k) for k, _ in own.pairs):
        if key in TAKEN:
            raise ConfigError(f"--{key} after `--`: the manifest sets it; give {TAKEN[key]} to `phalanx k8s "
                              f"manifest`, before `--`")
    C.build_config(own.recipe, own.pairs)
    return list(p.extra)


def manifest(p: Parsed) -> int:
    run = run_of(p)
    out = Path(p.values.out)
    check_destination(out, "--out", folder=True)
    out.mkdir(parents=True, exist_ok=True)
    for name, docs in k8s.manifests(run).items():
        (out / name).write_text(k8s.to_yaml(docs))
        print(f"wrote {out / name}")
    print(f"apply one: `kubectl apply -f {out / 'pytorchjob.yaml'}` (Kubeflow's training-operator) or `kubectl "
          f"apply -f {out / 'indexed-job.yaml'}`")
    return 0


SUBCOMMANDS = {
    "manifest": Command(Spec("phalanx k8s manifest --image IMAGE --volume CLAIM:MOUNT --run_dir DIR --out DIR "
                             "[options] -- [phalanx train options]", ABOUT, OPTIONS, passthrough=True,
                             epilog=EPILOG), manifest),
}


def kubernetes(argv: list[str]) -> int:
    return run_group("k8s", "Run on Kubernetes: the manifests of a training run (PyTorchJob, Indexed Job).",
                     SUBCOMMANDS, argv)


COMMANDS = {"k8s": kubernetes}
