"""Shards from object storage vs a prepared store vs torchvision's ImageFolder (issue 31).

    python benchmarks/streaming.py [--images 1000] [--workers 2] [--batch 64] [--sizes 64 224] [--json-out FILE]

A generated JPEG ImageFolder (photo-like, 256..480 px a side; benchmarks/loader.py's generator) is written as
tar shards (`phalanx data shard`, 8 MB each), uploaded to a moto S3 server on loopback, and prepared as a
store at each size. For each size, each reader runs in a fresh process and reads one epoch of the training
split in a random order as uint8 (or, for torchvision, float) batches of `--batch` with `--workers`
DataLoader workers:

- `s3 shards, cold`: `phalanx.data.shards` from the S3 server, an empty node cache: fetch + verify + decode,
  with training's prefetch thread fetching the next shards ahead of the batches;
- `s3 shards, warm`: the next epoch, every shard in the cache: decode only;
- `s3 shards, 1/4 cache`: a cache budget of a quarter of the shards: LRU out, every epoch fetches again;
- `store`: the prepared store's memory map, gathered by the same order (no decoding at all);
- `torchvision`: ImageFolder + Resize/CenterCrop/PILToTensor + DataLoader over the local files.

Reported per reader: img/s, bytes fetched per epoch by the node (the cache's fetch log), and memory: peak
resident memory (VmHWM: shared library pages included) of the reading process (one rank) and of its largest
DataLoader worker. The machine may be shared: read small
differences as noise.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
if str(SRC) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(SRC))

SHARD_SIZE = 8 * 10**6


def _make_jpeg_folder(root: Path, n: int) -> Path:
    spec = importlib.util.spec_from_file_location("phalanx_bench_loader", HERE / "loader.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_jpeg_folder(root, n)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _aws_env(url: str) -> dict:
    return {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": url, "AWS_EC2_METADATA_DISABLED": "true"}


def _hwm_mb(pid: int | str = "self") -> float:
    """Peak resident memory (VmHWM, MiB) of a process: reset at exec, unlike ru_maxrss."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _workers_mb(loader) -> float:
    """The largest peak resident memory among a DataLoader's worker processes (0 without workers)."""
    it = getattr(loader, "_iterator", None)
    return max((_hwm_mb(w.pid) for w in getattr(it, "_workers", [])), default=0.0)


# ----------------------------------------------------------------------------- one reader, in its own process

def run_one(args) -> dict:
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from phalanx.data.streaming import RankBatches, loader_kw, pass_batch

    torch.set_num_threads(1)
    size, workers, batch = args.size, args.workers, args.batch
    out: dict = {"reader": args.reader, "size": size, "workers": workers, "batch": batch}
    if args.reader.startswith("s3"):
        from phalanx.data.shard_write import parse_bytes
        from phalanx.data.shards import ShardSource, _Prefetcher
        budget = args.budget or "100GB"
        src = ShardSource(args.url, size, 3, Path(args.cache), parse_bytes(budget, "budget"))
        train = src["train"]
        sampler = src.sampler(batch, seed=0, world=1, rank=0, accum=1)
        order = RankBatches(sampler)
        loader = DataLoader(train, batch_sampler=order, collate_fn=pass_batch, **loader_kw(workers))
        epochs, worker_mb = [], 0.0
        for epoch in range(2):
            order.set_epoch(epoch)
            # as in training (ShardTrainLoader): a thread fetches the next shards ahead of the steps
            ahead = _Prefetcher(train, sampler.shard_sequence(epoch), sampler, src.ahead)
            before, n, t0 = src.cache.fetched(), 0, time.perf_counter()
            ahead.start()
            for step, (x, y) in enumerate(loader):
                ahead.at(step + 1)
                n += len(y)
            dt = time.perf_counter() - t0
            ahead.stop.set()
            ahead.moved.set()
            ahead.join(30)
            epochs.append({"img_per_s": round(n / dt, 1), "images": n,
                           "fetched_mb": round((src.cache.fetched() - before) / 1e6, 2)})
            worker_mb = max(worker_mb, _workers_mb(loader))
        out["epochs"] = epochs
        out["shard_mb"] = round(sum(s["bytes"] for s in train.shards) / 1e6, 2)
        out["cache_budget"] = budget
        out["rss_worker_mb"] = round(worker_mb, 1)
        del loader
    elif args.reader == "store":
        from phalanx.data.sampler import GlobalSampler
        from phalanx.data.store import open_store
        split = open_store(Path(args.store))["train"]
        sampler = GlobalSampler(len(split), batch, seed=0)
        n, t0 = 0, time.perf_counter()
        for _, _, idx in sampler.epoch(0):
            x = torch.from_numpy(np.take(split.images, np.sort(idx.numpy()), axis=0))
            n += len(x)
        out["epochs"] = [{"img_per_s": round(n / (time.perf_counter() - t0), 1), "images": n, "fetched_mb": 0.0}]
    else:  # torchvision
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder
        ds = ImageFolder(args.folder, transform=T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()]))
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
        loader = DataLoader(ds, batch_size=batch, sampler=perm, **loader_kw(workers))
        epochs, worker_mb = [], 0.0
        for _ in range(2):
            n, t0 = 0, time.perf_counter()
            for x, y in loader:
                n += len(y)
            epochs.append({"img_per_s": round(n / (time.perf_counter() - t0), 1), "images": n, "fetched_mb": 0.0})
            worker_mb = max(worker_mb, _workers_mb(loader))
        out["epochs"] = epochs
        out["rss_worker_mb"] = round(worker_mb, 1)
        del loader
    out["rss_main_mb"] = round(_hwm_mb(), 1)
    out.setdefault("rss_worker_mb", 0.0)
    return out


# ----------------------------------------------------------------------------- orchestration

def _child(argv: list[str], env: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"benchmark child {argv} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    ap.add_argument("--work", default="", help="folder for the generated data (default: $PHALANX_CACHE/bench)")
    ap.add_argument("--json-out", default=str(HERE / "results" / "streaming.json"))
    # one reader (internal: the orchestrator starts one process per reader)
    ap.add_argument("--reader", default="")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--url", default="")
    ap.add_argument("--cache", default="")
    ap.add_argument("--budget", default="")
    ap.add_argument("--store", default="")
    ap.add_argument("--folder", default="")
    args = ap.parse_args(argv)
    if args.reader:
        print(json.dumps(run_one(args)))
        return 0

    from phalanx.data.prepare import prepare
    from phalanx.data.shard_write import write_shards
    from phalanx.data.sources import cache_dir

    work = Path(args.work) if args.work else cache_dir() / "bench" / "streaming"
    folder = _make_jpeg_folder(work / f"jpeg-{args.images}", args.images)
    shards = work / f"shards-{args.images}"
    if not (shards / "index.json").is_file():
        write_shards(folder, shards, SHARD_SIZE, progress=False)
    stores = {s: work / f"store-{args.images}-{s}" for s in args.sizes}
    for s, p in stores.items():
        if not (p / "manifest.json").is_file():
            prepare(folder, p, size=s, channels=3, workers=args.workers, progress=False)

    port = _free_port()
    log = open(work / "moto.log", "ab")  # noqa: SIM115 - the server writes to it until it is stopped
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    env = dict(os.environ, **_aws_env(f"http://127.0.0.1:{port}"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped benchmark stops its server (finally below)
    rows = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or moto.poll() is not None:
                    raise SystemExit("moto_server did not start (pip install 'moto[server]')")
                time.sleep(0.2)
        os.environ.update(_aws_env(f"http://127.0.0.1:{port}"))
        import s3fs
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("bench")
        for f in sorted(shards.iterdir()):
            fs.put_file(str(f), f"bench/set/{f.name}")
        url = "s3://bench/set"
        total = sum(f.stat().st_size for f in shards.glob("train-*.tar"))
        common = ["--workers", str(args.workers), "--batch", str(args.batch)]
        for size in args.sizes:
            for reader, extra in (("s3", []), ("s3 1/4 cache", ["--budget", str(max(total // 4, 3 * SHARD_SIZE))]),
                                  ("store", ["--store", str(stores[size])]),
                                  ("torchvision", ["--folder", str(folder)])):
                cache = work / f"cache-{size}-{reader.replace(' ', '').replace('/', '')}-{time.time_ns()}"
                row = _child(["--reader", reader, "--size", str(size), "--url", url, "--cache", str(cache),
                              *common, *extra], env)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        os.kill(moto.pid, signal.SIGTERM)
        moto.wait(10)
        log.close()

    result = {"date": time.strftime("%Y-%m-%d"), "cpu": _cpu_name(), "cores": os.cpu_count(),
              "python": platform.python_version(), "images": args.images, "shard_size": SHARD_SIZE,
              "train_shard_mb": round(total / 1e6, 2), "rows": rows,
              "note": "one process per reader; 2 epochs for shards and torchvision (epoch 2: warm cache / page "
                      "cache), 1 for the store; shared machine"}
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def table(result: dict) -> str:
    lines = ["| size | reader | epoch 1 img/s | epoch 2 img/s | MB fetched per epoch (1, 2) | peak RSS main / "
             "worker MiB |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        e = r["epochs"]
        e2 = e[1] if len(e) > 1 else None
        name = {"s3": "S3 shards (cold, then cached)", "s3 1/4 cache": "S3 shards, cache 1/4 of the set",
                "store": "prepared store", "torchvision": "torchvision ImageFolder"}[r["reader"]]
        fetched = f"{e[0]['fetched_mb']:.1f}, {e2['fetched_mb']:.1f}" if e2 else f"{e[0]['fetched_mb']:.1f}"
        second = f"{e2['img_per_s']:,.0f}" if e2 else "-"
        lines.append(f"| {r['size']} | {name} | {e[0]['img_per_s']:,.0f} | {second} | {fetched} | "
                     f"{r['rss_main_mb']:.0f} / {r['rss_worker_mb']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
