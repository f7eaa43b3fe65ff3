"""In-memory snapshots (`--ckpt.snapshot_every N`): the newest training state kept in each node's shared memory,
so that a group the elastic agent restarts after a lost rank resumes from it instead of the last checkpoint.

A snapshot is TrainState.state_dict() (what a checkpoint holds), laid out as raw tensor bytes in a file of
`--ckpt.snapshot_dir` (a memory file system, /dev/shm) and a JSON marker beside it that holds the rest of the
state and the tensors' places; the marker is written last, so a snapshot counts only once it is whole. Each
holder keeps two slots and writes the older one, removing its marker first: a rank killed mid-write leaves the
other slot valid.

    SNAPSHOT_DIR/phalanx-snap-<run>-<host>-<agent pid>-o<origin>-s<slot>.bin    tensors, raw bytes
    SNAPSHOT_DIR/phalanx-snap-<run>-<host>-<agent pid>-o<origin>-s<slot>.json   marker: step, world, structure

<run> is a digest of the run directory; <host>-<agent pid> names the node that holds the copy (the elastic agent
lives across restarts, so two "nodes" on one machine stay apart, and the files of an agent that is gone are
stale); <origin> is whose state it is: `r` for a replicated model (DDP: every node's local rank 0 keeps the whole
state), a rank for a sharded one (FSDP: every rank keeps its own shards, and with two or more nodes also the
shards of the same local rank on the node before it, sent over a gloo group after each snapshot).

On a restart every rank lists the snapshots its node holds, the ranks gather the lists, and all take the newest
step for which every needed origin is held somewhere, when it is newer than the newest checkpoint on disk; a rank
whose node lacks its part receives it from a rank that holds it. Snapshots are not checkpoints: they live outside
the run directory, have no COMPLETE marker, are not resumed by a new command, and are removed when the run ends
(by its ranks) or fails for good (by the launcher, `remove_held_by_launcher`); the memory they take is checked
before the first one is written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from phalanx.errors import ConfigError
from phalanx.paths import process_alive

log = logging.getLogger("phalanx")

PREFIX = "phalanx-snap-"
VERSION = 1
ALIGN = 64  # tensor offsets in the data file: any dtype's view of the bytes is aligned
REPLICA = "r"


def run_key(run_dir: Path) -> str:
    """12 hex digits naming a run directory: the same on every node and after every restart."""
    return hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]


def holder_tag(agent_pid: int | None = None) -> str:
    """This node's name in snapshot files: the host and the elastic agent's pid (the rank's parent)."""
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:40] or "host"
    return f"{host}-{agent_pid if agent_pid is not None else os.getppid()}"


def due(every: int, global_step: int, step_in_epoch: int, steps_per_epoch: int) -> bool:
    """A snapshot after this step: every `every` steps, never at an epoch's end (its evaluation and
    checkpoint follow there, and a resume must not skip them)."""
    return every > 0 and global_step % every == 0 and step_in_epoch < steps_per_epoch


# ----------------------------------------------------------------------------- state <-> (skeleton, tensors)

def flatten(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """The JSON skeleton of a nested state, its tensors appended to `tensors` (a DTensor as its local shard)."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        tensors.append(obj.to_local().detach())
        return {"__tensor__": len(tensors) - 1, "dtensor": True}
    if isinstance(obj, torch.Tensor):
        tensors.append(obj.detach())
        return {"__tensor__": len(tensors) - 1}
    if isinstance(obj, dict):
        return {"__dict__": [[k, flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [flatten(v, tensors) for v in obj], "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot keep {type(obj).__name__} in a snapshot")


def unflatten(obj: Any, tensors: list[torch.Tensor], template: Any = None) -> Any:
    """`flatten` undone. A DTensor's shard becomes a DTensor again, laid out as the one at the same place in
    `template` (the live model's or optimizer's own state, on the same ranks)."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            t = tensors[obj["__tensor__"]]
            if obj.get("dtensor"):
                from torch.distributed.tensor import DTensor
                if not isinstance(template, DTensor):
                    raise ValueError("a sharded tensor of the snapshot has no sharded counterpart in this run")
                return DTensor.from_local(t.to(template.device), template.device_mesh, template.placements,
                                          run_check=False, shape=template.shape, stride=template.stride())
            return t
        if "__dict__" in obj:
            tmpl = template if isinstance(template, dict) else {}
            return {k: unflatten(v, tensors, tmpl.get(k)) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            tmpl = template if isinstance(template, (list, tuple)) else []
            items = [unflatten(v, tensors, tmpl[i] if i < len(tmpl) else None) for i, v in enumerate(obj["__list__"])]
            return tuple(items) if obj.get("tuple") else items
    return obj


def layout(tensors: list[torch.Tensor]) -> tuple[list[dict], int]:
    """([{dtype, shape, offset, nbytes}] per tensor, the data file's size): offsets aligned to ALIGN bytes."""
    out, off = [], 0
    for t in tensors:
        n = t.numel() * t.element_size()
        out.append({"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "offset": off, "nbytes": n})
        off += -(-n // ALIGN) * ALIGN
    return out, max(off, ALIGN)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 tensor on the CPU (a view where it can be)."""
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def read_tensors(data: torch.Tensor, places: list[dict]) -> list[torch.Tensor]:
    """The tensors `layout` placed in `data` (uint8), each a copy with its own memory: a view at an offset of
    the shared bytes crashes torch.set_rng_state (torch 2.14: a segmentation fault), and training must not
    keep all of `data` alive through one small tensor."""
    out = []
    for p in places:
        dtype = getattr(torch, p["dtype"])
        raw = data[p["offset"]:p["offset"] + p["nbytes"]]
        out.append(raw.view(dtype).reshape(p["shape"]).clone() if p["nbytes"] else torch.empty(p["shape"],
                                                                                                  dtype=dtype))
    return out


# ----------------------------------------------------------------------------- one holder's slots of one origin

@dataclass
class Marker:
    """What a slot holds; its file is written last."""
    version: int
    run: str
    holder: str
    origin: str
    step: int
    world: int
    local_world: int
    sharded: bool
    nbytes: int
    tensors: list
    skeleton: Any


def slot_paths(root: Path, run: str, holder: str, origin: str, slot: int) -> tuple[Path, Path]:
    base = root / f"{PREFIX}{run}-{holder}-o{origin}-s{slot}"
    return base.with_suffix(".bin"), base.with_suffix(".json")


def read_marker(path: Path) -> Marker | None:
    """A slot's marker, or None when it is missing, torn or of another format (the slot is then empty)."""
    try:
        m = Marker(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    data = path.with_suffix(".bin")
    if m.version != VERSION or not data.is_file() or data.stat().st_size < m.nbytes:
        return None
    return m


class Slots:
    """The two slots in which one holder keeps the snapshots of one origin; the mapped data files stay open."""

    def __init__(self, root: Path, run: str, holder: str, origin: str):
        self.root, self.run, self.holder, self.origin = root, run, holder, origin
        self._mapped: dict[int, torch.Tensor] = {}

    def paths(self, slot: int) -> tuple[Path, Path]:
        return slot_paths(self.root, self.run, self.holder, self.origin, slot)

    def next_slot(self) -> int:
        """The slot to write: an empty one, else the one with the older step."""
        steps = [(m.step if (m := read_marker(self.paths(s)[1])) else -1) for s in (0, 1)]
        return 0 if steps[0] <= steps[1] else 1

    def begin(self, nbytes: int) -> tuple[int, torch.Tensor]:
        """(slot, its data file mapped as `nbytes` uint8): the slot's marker is removed first, so the slot
        counts as empty until `commit`."""
        slot = self.next_slot()
        data, marker = self.paths(slot)
        marker.unlink(missing_ok=True)
        mapped = self._mapped.get(slot)
        if mapped is None or mapped.numel() != nbytes or not data.is_file():
            self._mapped.pop(slot, None)
            with open(data, "wb") as f:
                f.truncate(nbytes)
            mapped = torch.from_file(str(data), shared=True, size=nbytes, dtype=torch.uint8)
            self._mapped[slot] = mapped
        return slot, mapped

    def commit(self, slot: int, marker: Marker) -> None:
        """The slot's marker, written whole (a temporary file renamed): the snapshot counts from here."""
        path = self.paths(slot)[1]
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(marker)))
        os.replace(tmp, path)

    def write(self, marker: Marker, tensors: list[torch.Tensor] | None = None, raw: torch.Tensor | None = None) -> None:
        """Keep one snapshot: `tensors` placed as `marker.tensors` says, or `raw`, bytes received from a peer."""
        slot, mapped = self.begin(marker.nbytes)
        if raw is not None:
            mapped.copy_(raw)
        else:
            for t, place in zip(tensors, marker.tensors):
                if place["nbytes"]:
                    mapped[place["offset"]:place["offset"] + place["nbytes"]].copy_(as_bytes(t.cpu()))
        self.commit(slot, marker)

    def mapped(self, step: int) -> tuple[Marker, torch.Tensor] | None:
        """The marker and mapped bytes of the slot holding `step` (this process wrote them), else None."""
        for s in (0, 1):
            m = read_marker(self.paths(s)[1])
            if m is not None and m.step == step and s in self._mapped:
                return m, self._mapped[s][:m.nbytes]
        return None

    def close(self) -> None:
        self._mapped.clear()


def load_slot(marker_path: Path) -> tuple[Marker, torch.Tensor]:
    """A snapshot's marker and a private copy of its bytes (training must not alias the shared file, which
    the next snapshot overwrites)."""
    m = read_marker(marker_path)
    if m is None:
        raise FileNotFoundError(marker_path)
    data = torch.empty(m.nbytes, dtype=torch.uint8)
    with open(marker_path.with_suffix(".bin"), "rb") as f:
        if f.readinto(memoryview(data.numpy())) != m.nbytes:
            raise OSError(f"{marker_path.with_suffix('.bin')}: shorter than its marker says")
    if read_marker(marker_path) != m:  # rewritten while read (cannot happen on a restart, but costs nothing)
        raise OSError(f"{marker_path}: changed while read")
    return m, data


def held(root: Path, run: str, holder: str) -> list[tuple[Path, Marker]]:
    """The valid snapshots of `run` that `holder` keeps in `root`: (marker path, marker)."""
    out = []
    for p in sorted(root.glob(f"{PREFIX}{run}-{holder}-o*-s[01].json")):
        m = read_marker(p)
        if m is not None and m.run == run and m.holder == holder:
            out.append((p, m))
    return out


def remove(root: Path, run: str, holder: str | None = None) -> int:
    """Remove the snapshot files of `run` (of one holder, or all); how many files went."""
    n = 0
    pattern = f"{PREFIX}{run}-{holder}-o*" if holder else f"{PREFIX}{run}-*"
    for p in Path(root).glob(pattern):
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n


def remove_stale(root: Path, run: str) -> int:
    """Remove this host's snapshots of `run` whose elastic agent is gone (a launcher killed outright)."""
    host = holder_tag(0).rsplit("-", 1)[0]
    n = 0
    for p in Path(root).glob(f"{PREFIX}{run}-{host}-*"):
        m = re.match(rf"{re.escape(PREFIX + run)}-{re.escape(host)}-(\d+)-o", p.name)
        if m and not process_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            n += 1
    return n


def remove_held_by_launcher(run_dir: Path, root: str | Path) -> int:
    """Called by the launcher when its ranks are gone for good: the snapshots its agent's ranks kept."""
    return remove(Path(root), run_key(run_dir), holder_tag(os.getpid()))


def free_bytes(root: Path) -> int:
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize


def check_room(root: Path, need: int, have: int, every: int) -> None:
    """One ConfigError line when the node's snapshots (`need` bytes, `have` of them already in place) do not fit
    in the free space of `root`."""
    free = free_bytes(root)
    if need - have > free:
        mib = 2 ** 20
        raise ConfigError(f"--ckpt.snapshot_every {every}: this node's snapshots need {need / mib:,.0f} MiB in "
                          f"{root}, which has {free / mib:,.0f} MiB free; give the node more shared memory (e.g. "
                          f"docker --shm-size), point --ckpt.snapshot_dir at a larger memory file system, or turn "
                          f"snapshots off with --ckpt.snapshot_every 0")


# ----------------------------------------------------------------------------- the run's snapshots (collective)

@dataclass
class Plan:
    """What a restarted group resumes from: a snapshot of `step`, and per rank where its part comes from."""
    step: int
    sources: list[tuple[int, str]]   # per rank: (the rank that reads it from its node, origin)


class Snapshots:
    """A run's in-memory snapshots on this rank: taking them (`take`) and resuming from them (`plan`, `load`)."""

    def __init__(self, every: int, root: str | Path, run_dir: Path, rank: int, world: int, local_rank: int,
                 local_world: int, sharded: bool, group=None):
        self.every, self.root = every, Path(root)
        self.run, self.holder = run_key(run_dir), holder_tag()
        self.rank, self.world, self.local_rank, self.local_world = rank, world, local_rank, local_world
        self.sharded, self.group = sharded, group
        self.nodes = max(1, world // max(1, local_world))
        self.peered = sharded and self.nodes >= 2  # a sharded state is also kept by the next node
        self.writes = (sharded or local_rank == 0)
        self.origin = str(rank) if sharded else REPLICA
        self.own = Slots(self.root, self.run, self.holder, self.origin)
        self.peer_rank_to = (rank + local_world) % world
        self.peer_rank_from = (rank - local_world) % world
        self.kept_for_peer = Slots(self.root, self.run, self.holder, str(self.peer_rank_from)) if self.peered else None
        self.checked = False
        self.blocked_s: list[float] = []
        """Seconds each snapshot held the training thread (state_dict, copy into shared memory, peer copy)."""

    @classmethod
    def for_run(cls, every: int, root: str, run_dir: Path, env, sharded: bool, elastic: bool) -> Snapshots | None:
        """The run's snapshots, or None where they cannot serve: off, one process, or no elastic agent to restart
        the group. One ConfigError line when the folder is not there."""
        if every <= 0 or env.world <= 1 or not elastic:
            return None
        if not Path(root).is_dir():
            raise ConfigError(f"--ckpt.snapshot_dir {root}: no such folder on this node; give a memory file system "
                              f"(/dev/shm) or turn snapshots off with --ckpt.snapshot_every 0")
        group = None
        if dist.is_initialized() and dist.get_backend() != "gloo":  # bytes move between hosts' memories over gloo
            group = dist.new_group(backend="gloo")
        s = cls(every, root, run_dir, env.rank, env.world, env.local_rank, env.local_world, sharded, group)
        if env.local_rank == 0:
            remove_stale(s.root, s.run)
        return s

    # -- taking one (every rank, at the same step)

    def take(self, state, meta: dict) -> None:
        """Keep this step's state in shared memory (and, sharded on several nodes, on the next node too)."""
        t0 = time.perf_counter()
        sd = state.state_dict()  # collective: every rank's RNG state is gathered
        step = state.position.global_step
        sd["state"] = dict(sd["state"], **meta)
        tensors: list[torch.Tensor] = []
        skeleton = flatten({k: sd[k] for k in ("model", "optim", "ema", "state")}, tensors)
        places, nbytes = layout(tensors)
        if not self.checked:
            self._check_room(nbytes)
        marker = Marker(VERSION, self.run, self.holder, self.origin, step, self.world, self.local_world,
                        self.sharded, nbytes, places, skeleton)
        if self.writes:
            self.own.write(marker, tensors)
        if self.peered:
            self._copy_to_peer(step)
        self.blocked_s.append(time.perf_counter() - t0)

    def _check_room(self, nbytes: int) -> None:
        """Every rank raises the same line when any node's snapshots would not fit (before any is written)."""
        copies = 2 * (2 if self.peered else 1)  # two slots; a sharded state's peer copy beside its own
        sizes = _gather_ints([nbytes if self.writes else 0], self.group)
        node = self.rank // self.local_world
        mine = sum(sizes[r][0] for r in range(node * self.local_world, (node + 1) * self.local_world)) * copies
        already = sum(p.stat().st_size for p in self.root.glob(f"{PREFIX}{self.run}-{self.holder}-o*.bin"))
        err = ""
        if self.local_rank == 0:
            try:
                check_room(self.root, mine, already, self.every)
            except ConfigError as e:
                err = str(e)
        errors = [None] * self.world
        dist.all_gather_object(errors, err, group=self.group)
        first = next((e for e in errors if e), "")
        if first:
            raise ConfigError(first)
        self.checked = True

    def _copy_to_peer(self, step: int) -> None:
        """Send this rank's snapshot to the same local rank on the next node; keep the one from the node before."""
        got = self.own.mapped(step)
        marker, data = got
        mbytes = torch.frombuffer(bytearray(json.dumps(asdict(marker)).encode()), dtype=torch.uint8)
        sizes_out = torch.tensor([mbytes.numel(), data.numel()], dtype=torch.int64)
        sizes_in = torch.zeros(2, dtype=torch.int64)
        _exchange(sizes_out, self.peer_rank_to, sizes_in, self.peer_rank_from, self.group)
        mbuf = torch.empty(int(sizes_in[0]), dtype=torch.uint8)
        _exchange(mbytes, self.peer_rank_to, mbuf, self.peer_rank_from, self.group)
        theirs = Marker(**json.loads(bytes(mbuf.numpy()).decode()))
        theirs.holder = self.holder
        slot, mapped = self.kept_for_peer.begin(theirs.nbytes)
        _exchange(data, self.peer_rank_to, mapped, self.peer_rank_from, self.group)
        self.kept_for_peer.commit(slot, theirs)

    # -- resuming (every rank, in setup)

    def plan(self, disk_step: int) -> Plan | None:
        """The newest snapshot step every rank can load, when newer than `disk_step` (rank 0's newest checkpoint
        on disk, -1 without one); every rank gets the same answer."""
        mine = [(m.origin, m.step, m.world, m.local_world, m.sharded) for _, m in held(self.root, self.run,
                                                                                      self.holder)]
        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, (mine, disk_step), group=self.group)
        return choose(everyone, self.world, self.local_world, self.sharded)

    def fetch(self, plan: Plan) -> tuple[Marker, torch.Tensor]:
        """This rank's part of the planned snapshot: read from its node, or received from the rank that holds it
        (transfers in one order on every rank, each a blocking send and receive: none waits on another)."""
        mine: tuple[Marker, torch.Tensor] | None = None
        for dst, (src, origin) in enumerate(plan.sources):
            if src == dst and dst == self.rank:
                mine = self._read(origin, plan.step)
            elif src == self.rank and dst != self.rank:
                marker, data = self._read(origin, plan.step)
                mb = torch.frombuffer(bytearray(json.dumps(asdict(marker)).encode()), dtype=torch.uint8)
                dist.send(torch.tensor([mb.numel(), data.numel()], dtype=torch.int64), dst, group=self.group)
                dist.send(mb, dst, group=self.group)
                dist.send(data, dst, group=self.group)
            elif dst == self.rank:
                sizes = torch.zeros(2, dtype=torch.int64)
                dist.recv(sizes, src, group=self.group)
                mb = torch.empty(int(sizes[0]), dtype=torch.uint8)
                dist.recv(mb, src, group=self.group)
                data = torch.empty(int(sizes[1]), dtype=torch.uint8)
                dist.recv(data, src, group=self.group)
                mine = (Marker(**json.loads(bytes(mb.numpy()).decode())), data)
        return mine

    def _read(self, origin: str, step: int) -> tuple[Marker, torch.Tensor]:
        for path, m in held(self.root, self.run, self.holder):
            if m.origin == origin and m.step == step:
                return load_slot(path)
        raise FileNotFoundError(f"snapshot of origin {origin} at step {step}")

    def remove_own(self) -> None:
        """The run ended: this node's snapshots go (after every rank is done with them)."""
        self.own.close()
        if self.kept_for_peer is not None:
            self.kept_for_peer.close()
        if self.local_rank == 0:
            remove(self.root, self.run, self.holder)


def restore(state, marker: Marker, data: torch.Tensor, rank: int) -> dict:
    """Load a fetched snapshot into the training state; returns its 'state' part (position, meta)."""
    tensors = read_tensors(data, marker.tensors)
    if not marker.sharded:
        sd = unflatten(marker.skeleton, tensors)
        sd["sharded"] = False
        state.load_state_dict(sd, Path(f"in-memory snapshot of step {marker.step}"), rank)
        return sd["state"]
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    template = {"model": state.strategy.model_state(), "optim": state.strategy.optim_state(state.optimizer),
                "ema": state.ema.state_dict() if state.ema is not None else None}
    sd = unflatten(marker.skeleton, tensors, template)
    set_model_state_dict(state.plain, sd["model"])
    set_optimizer_state_dict(state.plain, state.optimizer, sd["optim"])
    if state.ema is not None and sd["ema"] is not None:
        state.ema.load_state_dict(sd["ema"])
    state.load_progress(sd["state"], rank)
    return sd["state"]


def choose(everyone: list, world: int, local_world: int, sharded: bool) -> Plan | None:
    """The plan from every rank's (held snapshots, newest disk step): the newest step newer than rank 0's disk
    step for which every needed origin is held by some rank; each rank reads its part itself when its node holds
    it, else from the lowest rank that does. A sharded snapshot serves only the same layout of ranks."""
    disk = everyone[0][1]
    where: dict[tuple[str, int], list[int]] = {}
    for r, (items, _) in enumerate(everyone):
        for origin, step, w, lw, sh in items:
            if sh == sharded and (not sharded or (w, lw) == (world, local_world)):
                where.setdefault((origin, step), []).append(r)
    for step in sorted({s for _, s in where}, reverse=True):
        if step <= disk:
            break
        origins = [str(r) if sharded else REPLICA for r in range(world)]
        if all((o, step) in where for o in origins):
            return Plan(step, [(r if r in where[(o, step)] else min(where[(o, step)]), o)
                               for r, o in enumerate(origins)])
    return None


def _gather_ints(values: list[int], group) -> list[list[int]]:
    t = torch.tensor(values, dtype=torch.int64)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t, group=group)
    return [x.tolist() for x in out]


def _exchange(send: torch.Tensor, to: int, recv: torch.Tensor, frm: int, group) -> None:
    """Send to one rank while receiving from another (a ring: every rank does both at once)."""
    reqs = [dist.isend(send.contiguous(), to, group=group), dist.irecv(recv, frm, group=group)]
    for r in reqs:
        r.wait()


def newest_disk_step(ckpt_root: Path) -> int:
    """The step of the newest checkpoint folder on disk, valid or not (-1: none): a snapshot must be newer."""
    steps = [int(p.name[5:]) for p in Path(ckpt_root).glob("step-*") if p.name[5:].isdigit()]
    return max(steps, default=-1)


def resume_from_snapshot(run, disk_step: int) -> bool:
    """Resume `run` (train/setup.py's Run) from the newest snapshot newer than `disk_step`; False when there is
    none (the caller resumes from disk). Collective: every rank takes part and gets the same answer."""
    snaps, env, state = run.snapshots, run.env, run.state
    env.phase = "looking for in-memory snapshots"
    t0 = time.perf_counter()
    plan = snaps.plan(disk_step)
    if plan is None:
        return False
    env.phase = f"loading the in-memory snapshot of step {plan.step}"
    marker, data = snaps.fetch(plan)
    st = restore(state, marker, data, env.rank)
    pos = state.position
    if run.budget is not None and st.get("budget_spent_s") is not None:
        run.budget.spent_before = float(st["budget_spent_s"])
    src, _ = plan.sources[env.rank]
    where = "this node's memory" if src == env.rank else f"rank {src}'s node"
    disk = f"the newest checkpoint on disk is of step {disk_step}" if disk_step >= 0 else "no checkpoint on disk yet"
    run.log.info(f"resumed from the in-memory snapshot of step {plan.step} ({where}, {marker.nbytes / 2**20:.1f} MiB "
                 f"in {time.perf_counter() - t0:.2f} s) at epoch {pos.epoch + 1}, step {pos.step} (global step "
                 f"{pos.global_step}); {disk}")
    return True
