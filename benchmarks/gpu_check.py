"""`make gpu-check`: Phalanx on one CUDA GPU, offline, in one short call (< 8 minutes).

    python3 benchmarks/gpu_check.py [--budget-s 450] [--only NAME ...]

Run on the GPU machine with the folder `make gpu-pack` built (.gpu/) beside the checkout. It installs
Phalanx and the carried wheels with --no-index --no-build-isolation, then runs each check in its own
subprocess and fresh directory, and prints one JSON line per check (`{"check": NAME, ...}`):

  device        GPU, driver, torch/CUDA/cuDNN versions, bf16, the carried wheels importable
  recipe_1gpu   the default recipe on one GPU, evaluated every epoch: time to 93%, img/s, peak memory
  recipe_1gpu_16ep  the same recipe stretched to 16 epochs: time to 93% / 94%
  ddp_2rank     2 ranks on the one GPU through DDP with --parallel.backend gloo
  resnet50      ResNet-50 224x224 synthetic-data training throughput, eager and torch.compile
  prefetch      the store loader's side-stream copies (pinned, prefetched) equal the GPU-resident batches
  loader        benchmarks/loader.py --quick (store loader, JPEG streaming vs torchvision, memory)

A check that fails or runs out of time prints its error and the tail of its output, and the next runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / ".gpu"


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def sh(cmd: list[str], timeout: float, env: dict | None = None, cwd: Path | None = None) -> tuple[int, str]:
    """Run `cmd`; (exit code, stdout+stderr). 124 when it ran out of time."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
        return r.returncode, r.stdout + r.stderr
    except OSError as e:  # no such program
        return 127, str(e)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"") + (e.stderr or b"")
        return 124, out.decode(errors="replace") if isinstance(out, bytes) else out


def install() -> dict:
    """Phalanx (editable) and the carried wheels, from the local folder only."""
    wheels = PACK / "wheels"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-build-isolation",
           "--find-links", str(wheels), "-e", str(ROOT)]
    rc, out = sh(cmd, 180)
    row = {"check": "install", "ok": rc == 0, "wheels": sorted(p.name for p in wheels.glob("*.whl"))}
    if rc != 0:  # still runnable from the checkout (PYTHONPATH), without what the wheels would add
        row["error"] = out[-1500:]
    return row


def child_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PHALANX_CACHE=str(Path(tempfile.gettempdir()) / "phalanx-gpu-cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if (PACK / "fashion-mnist").is_dir():
        env["PHALANX_FASHION_MNIST"] = str(PACK / "fashion-mnist")
    return env


# ----------------------------------------------------------------------------- checks (each in a subprocess)

def check_device() -> dict:
    import torch
    row = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "python": sys.version.split()[0], "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        row.update(gpu=p.name, gpus=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}",
                   memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                   bf16=torch.cuda.is_bf16_supported())
    try:
        import simplejpeg  # noqa: F401
        row["simplejpeg"] = True
    except ImportError:
        row["simplejpeg"] = False
    import torchvision
    row["torchvision"] = torchvision.__version__
    rc, out = sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                  "--format=csv,noheader"], 20)
    row["nvidia_smi"] = out.strip()
    return row


def _train_run(run_dir: Path, args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, "-m", "phalanx", "train", "--progress", "false", "--ckpt.at_epoch_end", "false",
           "--run_dir", str(run_dir), *args]
    t0 = time.perf_counter()
    rc, out = sh(cmd, timeout, env=child_env())
    wall = time.perf_counter() - t0
    row: dict = {"rc": rc, "command_s": round(wall, 1), "args": " ".join(args)}
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    evals = [r for r in rows if r["event"] == "eval"]
    trains = [r for r in rows if r["event"] == "train"]
    if evals:
        for target in (0.93, 0.94):
            hit = next((r for r in evals if r["acc"] >= target), None)
            row[f"time_to_{round(target * 100)}_s"] = hit["wall_s"] if hit else None
            row[f"epoch_to_{round(target * 100)}"] = hit["epoch"] if hit else None
        row.update(final_acc=evals[-1]["acc"], epochs=evals[-1]["epoch"], train_s=evals[-1]["wall_s"],
                   epoch_img_s=[r["train_img_s"] for r in evals],
                   peak_mem_mb=max((r.get("peak_mem_mb", 0) for r in evals), default=None))
    if trains:
        rates = sorted(r["img_s"] for r in trains[1:] or trains)  # the first window holds the warm-up
        row["median_img_s"] = rates[len(rates) // 2]
    if rc != 0 or not evals:
        row["error"] = out[-2500:]
    return row


def check_recipe_1gpu(tmp: Path) -> dict:
    """The default recipe as it is (6 epochs), evaluated after every epoch."""
    return _train_run(tmp / "recipe", ["--nproc", "1", "--eval_every", "1"], 150)


def check_recipe_1gpu_16ep(tmp: Path) -> dict:
    """The default recipe stretched to 16 epochs (its schedule with it): time to 94%."""
    return _train_run(tmp / "recipe16", ["--nproc", "1", "--epochs", "16", "--eval_every", "1"], 150)


def check_ddp_2rank(tmp: Path) -> dict:
    return _train_run(tmp / "ddp", ["--nproc", "2", "--parallel.backend", "gloo", "--epochs", "2",
                                    "--eval_every", "1"], 150)


def check_resnet50(compile_: bool, steps: int = 30, batch: int = 256) -> dict:
    """Training img/s of torchvision's ResNet-50 on random 224x224 images: bf16 autocast, channels-last, SGD."""
    import torch
    import torch.nn.functional as F
    import torchvision
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = torch.device("cuda")
    model = torchvision.models.resnet50(num_classes=1000).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step_model = torch.compile(model) if compile_ else model
    x = torch.randn(batch, 3, 224, 224, device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(step_model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(5):  # warm-up: cuDNN autotuning, and the compilation when compiled
        step()
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    s = start.elapsed_time(end) / 1e3
    return {"compile": compile_, "batch": batch, "steps": steps, "img_s": round(batch * steps / s, 1),
            "step_ms": round(1e3 * s / steps, 2), "warmup_s": round(warm, 1),
            "peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


def check_prefetch(tmp: Path, steps: int = 40) -> dict:
    """TrainLoader copying from host memory on a side stream (pinned, prefetched) gives the same batches
    as the copy resident on the GPU; img/s of both."""
    import torch

    from phalanx.config import AugmentConfig
    from phalanx.data.augment import Normalize
    from phalanx.data.loader import TrainLoader
    from phalanx.data.sampler import GlobalSampler
    from phalanx.data.sources import load_store

    dev = torch.device("cuda", 0)
    store = load_store("fashion_mnist")
    split = store["train"]
    sampler = GlobalSampler(len(split), 512, seed=0)
    norm = Normalize(store.mean, store.std, dev, channels_last=True)
    aug = AugmentConfig(crop_pad=2, flip=True, cutout=0)
    row: dict = {}
    batches = {}
    for name, resident in (("prefetched", False), ("resident", True)):
        loader = TrainLoader(split, sampler, aug, norm, dev, seed=0, prefetch=True, resident=resident)
        row[f"{name}_uses_side_stream"] = loader.prefetch
        got, t0 = [], time.perf_counter()
        for i, b in enumerate(loader.epoch(1)):
            got.append((b.x.sum(dtype=torch.float64), b.y.clone()))
            if i + 1 == steps:
                break
        torch.cuda.synchronize()
        row[f"{name}_img_s"] = round(512 * steps / (time.perf_counter() - t0), 1)
        batches[name] = got
    row["identical"] = all(bool(torch.equal(ya, yb)) and float(xa) == float(xb)
                           for (xa, ya), (xb, yb) in zip(batches["prefetched"], batches["resident"]))
    return row


def check_loader(tmp: Path) -> dict:
    out = tmp / "loader.json"
    rc, text = sh([sys.executable, str(ROOT / "benchmarks" / "loader.py"), "--quick", "--json-out", str(out)], 200,
                  env=child_env())
    if rc != 0 or not out.is_file():
        return {"rc": rc, "error": text[-2500:]}
    res = json.loads(out.read_text())
    return {"rc": rc, "store_img_s_1thread": res["a_store"]["img_per_s"],
            "jpeg": [{"size": r["size"], "workers": r["workers"], "phalanx_img_s": r["phalanx"]["img_per_s"],
                      "torchvision_img_s": r["torchvision"]["img_per_s"], "ratio": r["ratio_loader"]}
                     for r in res["b_folder"]["runs"]],
            "second_rank_adds_frac": res["c_memory"]["second_rank_adds_frac"]}


# name -> (the check, given a fresh temporary directory; seconds it may take at most)
CHECKS = {
    "device": (lambda tmp: check_device(), 60),
    "recipe_1gpu": (check_recipe_1gpu, 160),
    "recipe_1gpu_16ep": (check_recipe_1gpu_16ep, 160),
    "ddp_2rank": (check_ddp_2rank, 160),
    "resnet50_eager": (lambda tmp: check_resnet50(False), 90),
    "resnet50_compile": (lambda tmp: check_resnet50(True), 200),
    "prefetch": (check_prefetch, 90),
    "loader": (check_loader, 220),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=450, help="stop starting checks after this many seconds")
    ap.add_argument("--only", nargs="*", choices=list(CHECKS), help="run only these checks")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one check in this process
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    ap.add_argument("--no-install", action="store_true", help="use the installed Phalanx / the checkout as is")
    a = ap.parse_args(argv)
    if a.one:
        emit({"check": a.one, **CHECKS[a.one][0](Path(a.tmp))})
        return 0

    t_start = time.perf_counter()
    if not a.no_install:
        emit(install())
    for name in a.only or list(CHECKS):
        left = a.budget_s - (time.perf_counter() - t_start)
        if left < 20:
            emit({"check": name, "skipped": f"budget of {a.budget_s:.0f} s spent"})
            continue
        with tempfile.TemporaryDirectory(prefix=f"gpu-check-{name}-") as tmp:  # a fresh directory per check
            t0 = time.perf_counter()
            rc, out = sh([sys.executable, __file__, "--one", name, "--tmp", tmp], min(CHECKS[name][1], left),
                         env=child_env())
            line = next((x for x in reversed(out.splitlines()) if x.startswith('{"check"')), None)
            if line is None:
                emit({"check": name, "rc": rc, "wall_s": round(time.perf_counter() - t0, 1),
                      "error": "timed out" if rc == 124 else out[-2500:]})
            else:
                row = json.loads(line)
                row["wall_s"] = round(time.perf_counter() - t0, 1)
                emit(row)
    emit({"check": "total", "wall_s": round(time.perf_counter() - t_start, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
