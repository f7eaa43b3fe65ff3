"""The training loop, readable top to bottom; the parallel pieces are passed in, not hidden in hooks.

    setup (run dir, data, model + strategy, state, resume)
      -> for each micro-batch: train_step (forward, backward, gradient all-reduce, optimizer, EMA)
      -> cadence: log, preemption, periodic checkpoint; per epoch: evaluate, checkpoint
      -> finish (final weights, summary, curves)
"""
from __future__ import annotations

import itertools
import json
import math
import re
import time
from pathlib import Path

import torch

from phalanx import config as C
from phalanx.data.loader import eval_chunks, to_nchw
from phalanx.errors import ConfigError
from phalanx.observe.console import Progress, TrainMeter
from phalanx.observe.profile import StepProfiler
from phalanx.parallel.collectives import broadcast_object, ranks_holding
from phalanx.parallel.invariant import loss_scale, micro_steps
from phalanx.runtime import dist as rdist
from phalanx.runtime import hang
from phalanx.train import cadence, faults, snapshot
from phalanx.train import checkpoint as ckpt
from phalanx.train.budget import eval_seconds_guess
from phalanx.train.checkpoint_writer import CheckpointWriter, asynchronous
from phalanx.train.evaluate import evaluate
from phalanx.train.finish import finish
from phalanx.train.rate_check import RateCheck, expectation, verdict_line
from phalanx.train.setup import Run, setup
from phalanx.train.startup import line as startup_line
from phalanx.train.state import Position
from phalanx.train.step import train_step


def train(cfg: C.Config) -> dict:
    """Train per `cfg` on this process's rank; returns the final metrics (on every rank)."""
    env = rdist.init(cfg.parallel, cfg.device, cfg.run_dir)
    try:
        return fit(setup(cfg, env))
    except RuntimeError as e:  # DistBackendError and gloo's errors are RuntimeErrors
        if env.world > 1 and _looks_like_peer_failure(e):
            stop_for_peer_failure(env, e, Path(cfg.run_dir or "RUN_DIR") / "logs")
        raise
    finally:
        hang.disarm()
        rdist.teardown()


def stop_for_peer_failure(env: rdist.DistEnv, e: RuntimeError, logs: Path) -> None:
    """One line naming the rank that failed, on the console, in this rank's log and in the launcher's
    report; then exit 1. A timed-out collective means a stalled rank: the ranks that are alive check in
    through the store, and the ones that do not are named, with where they stood: asked for their stacks
    (runtime/hang.py), each writes them into its log, and the line names the innermost Phalanx frame of each."""
    detail = re.sub(r"^\[[^\]]*\]\s*", "", str(e).splitlines()[0]).split(". ")[0]
    timed_out = any(w in str(e).lower() for w in ("timed out", "timeout"))
    waiting_in = hang.collective_now()
    if timed_out:
        hang.write_own_stacks(e, f"a collective timed out while {env.phase}")
    silent = rdist.unanswered_ranks(env) if timed_out and env.distributed else []  # no store before init
    store_lost = silent is None and env.store_on_rank0 and env.rank != 0
    if store_lost:
        silent, how = [0], "neither its collectives nor the store it hosts answered"
    else:
        how = f"it did not check in through the store within {rdist.ANSWER_WINDOW_S:g} s either"
    if silent:
        answers = hang.ask_stacks(logs, silent)
        who = (f"rank {silent[0]}{rdist.node_of(env, silent[0])} stalled {hang.where(answers[0])}" if len(silent) == 1 else
               f"ranks {', '.join(map(str, silent))} stalled ({'; '.join(f'rank {a.rank} {hang.where(a)}' for a in answers)})")
        msg = (f"phalanx: {who}. Rank {env.rank} timed out waiting for it{' in ' + waiting_in if waiting_in else ''} "
               f"while {env.phase} ({detail}), and {how}; its {'log' if answers[0].silence else 'stacks and log'}: "
               f"{logs / f'rank-{silent[0]}.log'}")
    else:
        msg = (f"phalanx: rank {env.rank} stopped while {env.phase}: another rank exited or stalled "
               f"({detail}). The launcher's report below names the failing rank; every rank's log is in "
               f"{logs}/rank-K.log")
    # In this rank's log, and on the console unless Phalanx's launcher prints the failing rank's line once. When
    # silent ranks were found, the agent reports this rank as the failure: its report must name the stalled one.
    from phalanx.runtime.launch import tell_from_rank
    # On another node than rank 0's, the launcher's agent waits minutes on its rendezvous store there: say it now.
    tell_from_rank(msg, for_agent=bool(silent), console=store_lost and env.local_world < env.world)
    if not timed_out:
        # Exit after the peer: the agent names the first rank it sees exit as the root cause, and
        # forked ranks are polled together (it checks every 0.1 s under `phalanx train --nproc`).
        time.sleep(1.0)
    raise SystemExit(1) from None


def _looks_like_peer_failure(e: BaseException) -> bool:
    s = str(e).lower()
    return any(w in s for w in ("connection", "timed out", "timeout", "peer", "broken pipe", "closed", "gloo",
                                "nccl", "socket"))


def fit(run: Run) -> dict:
    """Train from the state's position to the end of the run (or a preemption); returns the last evaluation."""
    run.writer = CheckpointWriter(asynchronous(run.cfg.ckpt, run.state.strategy.sharded))
    ended = False
    try:
        result = train_to_end(run)
        run.writer.close()  # the last checkpoint is sealed before the command returns; a failed write says so
        ended = True
        if run.snapshots is not None:  # the run ended (finished or preempted, its checkpoint sealed): not needed
            run.snapshots.remove_own()
        return result
    finally:
        if not ended:  # an error ends the run: the checkpoint in flight is still sealed, the error stays the first
            run.writer.close(raise_errors=False)
        run.metrics.close()  # TensorBoard's files complete however the run ends


def train_to_end(run: Run) -> dict:
    cfg, env, state = run.cfg, run.env, run.state
    preempt = cadence.Preemption()
    progress = Progress(run.total_steps, min(state.position.global_step, run.total_steps), cfg.progress and env.is_main)
    meter, timer = TrainMeter(env.device), Timer()
    # rank 0 times its first minute of steps against the speed the tuner's decision expects
    rate_check = RateCheck(expectation() if env.is_main else None, cfg.global_batch)
    profiler = StepProfiler(cfg.log.profile, cfg.log.profile_start, run.run_dir / "profile", env.rank, env.device,
                            env.is_main)
    samples = (open(run.run_dir / "logs" / f"samples-rank-{env.rank}.jsonl", "a")  # noqa: SIM115 (closed below)
               if cfg.log_samples else None)
    result: dict = {}
    accum = micro_steps(cfg, env.world)  # micro-steps per optimizer step on this rank (M / W when invariant)
    try:
        for epoch in itertools.count(state.position.epoch):  # to run.epochs, which a budget may move
            if epoch >= run.epochs or state.position.global_step >= run.total_steps:
                break
            state.model.train()
            t_epoch, imgs_epoch = time.perf_counter(), 0
            start = state.position.step if epoch == state.position.epoch else 0
            for batch in run.loader.epoch(epoch, start):
                env.phase = f"training epoch {epoch + 1} step {batch.step + 1} (forward/backward, gradient all-reduce)"
                next_global = state.position.global_step + 1  # the optimizer step this batch belongs to
                loss_sum, stepped = train_step(
                    state, batch, accum, loss_scale(cfg, env.world), cfg.optim.label_smoothing,
                    cfg.optim.grad_clip, cadence.ema_steps(next_global, cfg.ema_every, next_global >= run.total_steps))
                meter.add(loss_sum, len(batch.y))
                if samples is not None:
                    samples.write(json.dumps({"epoch": epoch, "step": batch.step, "micro": batch.micro,
                                              "idx": batch.idx.tolist()}) + "\n")
                if not stepped:
                    continue
                profiler.step()
                imgs_epoch += cfg.global_batch
                if after_optimizer_step(run, batch, meter, progress, epoch, timer, preempt):
                    return stop_for_preemption(run, epoch, preempt.signal_name)
                if (verdict := rate_check.step(state.position.global_step >= run.total_steps)) is not None:
                    check_tuned_rate(run, verdict)
                if state.position.global_step >= run.total_steps:
                    break
            result = end_of_epoch(run, epoch, imgs_epoch / max(time.perf_counter() - t_epoch, 1e-9), timer) or result
            rate_check.gap()  # the evaluation and the next epoch's start are not training steps
    finally:
        profiler.close()
        progress.close()
        preempt.restore()
        if samples is not None:
            samples.close()
    if not result:  # no epoch ended here: a finished run started again, or restarted after its last step
        result = final_evaluation(run, timer)
    weights = state.strategy.full_state(state.export_model)  # gathered on rank 0 when sharded (collective)
    with rdist.rank0_alone(env):  # the others wait, with joining's timeout, while rank 0 writes and plots
        if env.is_main:
            finish(run, result, time.perf_counter() - timer.start, weights)
    return dict(result, run_dir=str(run.run_dir))


# ----------------------------------------------------------------------------- what the loop does at its cadence

class Timer:
    """The run's start and the last checkpoint's time."""

    def __init__(self):
        self.start, self.last_checkpoint = time.perf_counter(), time.monotonic()

    def minutes_since_checkpoint(self) -> float:
        return (time.monotonic() - self.last_checkpoint) / 60

    def checkpointed(self) -> None:
        self.last_checkpoint = time.monotonic()


def after_optimizer_step(run: Run, batch, meter: TrainMeter, progress: Progress, epoch: int, timer: Timer,
                         preempt: cadence.Preemption) -> bool:
    """Advance the position; log, checkpoint when due. True when the ranks agreed to stop (preemption)."""
    cfg, env, pos = run.cfg, run.env, run.state.position
    pos.step, pos.global_step = batch.step + 1, pos.global_step + 1
    if not run.memory:  # after this process's first step (a resumed one's too): the optimizer state exists now
        report_startup(run)
        rdist.set_collective_timeout(cfg.parallel.timeout_s, env)
        report_memory(run)
    faults.maybe("step", env.rank, pos.global_step)
    if run.budget is not None:
        follow_budget(run, progress)
    meter.step(cfg.global_batch)
    report_progress(run, meter, progress, epoch, cadence.log_every(run.steps_per_epoch))
    # Signals and clocks differ between ranks: they count only at steps where the ranks agree on them (one
    # all-reduce), every step on CPU or alone, at the logging cadence where reading a flag waits for the GPU.
    agreeing = env.world == 1 or pos.global_step % cadence.agree_every(run.steps_per_epoch,
                                                                       env.accel.host_reads_sync) == 0
    due = cadence.periodic_checkpoint_due(cfg.ckpt, pos.global_step, pos.step, run.steps_per_epoch,
                                          timer.minutes_since_checkpoint() if agreeing else 0.0)
    if agreeing:
        env.phase = f"agreeing on preemption at step {pos.global_step}"
        by_time = bool(cfg.ckpt.every_minutes)
        agreed = cadence.agree_all([preempt.requested] + ([due] if by_time else []), env.device)
        if agreed[0]:
            return True
        if by_time:
            due = agreed[1]
    if due:
        save_checkpoint(run, "periodic")
        timer.checkpointed()
    elif run.snapshots is not None and snapshot.due(run.snapshots.every, pos.global_step, pos.step,
                                                    run.steps_per_epoch):
        take_snapshot(run)
    return False


def take_snapshot(run: Run) -> None:
    """The state into this node's shared memory (train/snapshot.py); every rank takes part."""
    env, state = run.env, run.state
    env.phase = f"taking an in-memory snapshot at step {state.position.global_step}"
    meta = {"global_batch": run.cfg.global_batch, "reason": "snapshot"}
    if run.budget is not None:
        meta["budget_spent_s"] = round(run.budget.spent(), 3)
    run.snapshots.take(state, meta)
    run.log.debug(f"in-memory snapshot of step {state.position.global_step} in "
                  f"{1e3 * run.snapshots.blocked_s[-1]:.0f} ms")


def report_startup(run: Run) -> None:
    """The seconds from the command's start to this first optimizer step, by phase: one line, and (finish)
    summary.json's `startup_s`."""
    if run.startup is None:
        return
    run.startup.mark("first_step")
    run.log.info(startup_line(run.startup.seconds()))


def check_tuned_rate(run: Run, verdict: dict) -> None:
    """The tuner's decision against this run's first minute: in metrics.jsonl (the launcher records it in the
    cache), and one line when the run trains more than 10% slower than it expected."""
    run.metrics.write(event="tune_check", step=run.state.position.global_step, **verdict)
    if verdict["stale"]:
        run.log.warning(verdict_line(verdict))
    else:
        run.log.debug(f"the tuned layout ({verdict['label']}) trains at {verdict['measured_img_s']:,.0f} img/s, "
                      f"{verdict['expected_img_s']:,.0f} expected")


def follow_budget(run: Run, progress: Progress) -> None:
    """Every few steps, rank 0 measures the speed and sets the step count that fits before the deadline;
    every rank takes it (the loop, the LR schedule and the progress bar)."""
    pos = run.state.position
    due = pos.global_step % run.budget.every == 0
    run.step_clock.tick(mark=due)  # the clock is read only where the estimate's broadcast waits for the device
    if not due:
        return
    run.env.phase = f"estimating the steps that fit in the budget at step {pos.global_step}"
    plan = None
    step_s = run.step_clock.step_s()
    if run.eval_s is None and run.step_clock.ready():  # every rank at the same step (a sharded forward is collective)
        run.eval_s = time_evaluation(run)
    if run.env.is_main and step_s is not None:
        b, cfg = run.budget, run.cfg
        reserve = b.reserve(run.eval_s if run.eval_s is not None else
                            eval_seconds_guess(len(run.test_data.split), cfg.tta_flip, cfg.global_batch / step_s))
        total = b.total_steps(pos.global_step, step_s, reserve, cfg.max_steps or None, check_every=b.every)
        # when the run is predicted to end, counted from the command's start (earlier attempts included)
        predicted = b.spent() + (total - pos.global_step) * step_s + reserve - b.MARGIN_FRAC * b.seconds
        plan = (total, round(predicted, 1))
    plan = broadcast_object(plan)
    if plan is not None:
        run.set_total_steps(plan[0])
        run.predicted_s = plan[1]
        progress.set_total(plan[0])


@torch.no_grad()
def time_evaluation(run: Run) -> float:
    """Seconds the final evaluation will take on this rank: one evaluation chunk's forward timed (the second of
    two: the first builds the kernels), times this rank's chunks, twice with TTA."""
    state, cfg, env = run.state, run.cfg, run.env
    n = len(run.test_data.split)
    x, _ = run.test_data.gather(torch.arange(0, min(cfg.eval_batch, n)))
    x = run.normalize(to_nchw(x))
    model = state.eval_model
    was_training = model.training
    model.eval()
    with state.precision.autocast():
        model(x)
        state.accel.synchronize(env.device)
        t0 = time.perf_counter()
        model(x)
        state.accel.synchronize(env.device)
        chunk_s = time.perf_counter() - t0
    model.train(was_training)
    per_rank = max(len(eval_chunks(n, cfg.eval_batch, env.world, r)) for r in range(env.world))
    return chunk_s * per_rank * (2 if cfg.tta_flip else 1)


def end_of_epoch(run: Run, epoch: int, epoch_img_s: float, timer: Timer) -> dict | None:
    """Evaluate when due; after a whole epoch, move to the next and checkpoint. Returns the evaluation, if any.
    Under a budget only the last epoch is evaluated: an evaluation would take time from training."""
    cfg, state = run.cfg, run.state
    last = cadence.is_last_epoch(epoch, run.epochs, state.position.global_step, run.total_steps)
    res = None
    if cadence.eval_due(epoch, cfg.eval_every if run.budget is None else run.epochs + 1, last):
        res = evaluate_now(run, epoch, epoch_img_s, time.perf_counter() - timer.start)
    if state.position.step >= run.steps_per_epoch:
        state.position = Position(epoch + 1, 0, state.position.global_step)
        if cfg.ckpt.at_epoch_end:  # also after the last epoch: re-running a finished run trains nothing
            save_checkpoint(run, "end of training" if last else "end of epoch")
            timer.checkpointed()
    return res


def report_memory(run: Run) -> None:
    """What this rank holds for training (parameters, gradients, optimizer state), logged by every rank to
    its file and by rank 0 to the console, and kept for summary.json."""
    state = run.state
    mem = state.strategy.memory(state.optimizer)
    run.memory = dict(mem, total_bytes=sum(mem.values()))
    mib = {k: v / 2**20 for k, v in run.memory.items()}
    run.log.info(f"memory per rank ({state.strategy.name}, {run.env.world} ranks): parameters "
                 f"{mib['param_bytes']:.1f} MiB, gradients {mib['grad_bytes']:.1f} MiB, optimizer state "
                 f"{mib['optim_bytes']:.1f} MiB, total {mib['total_bytes']:.1f} MiB")


def report_progress(run: Run, meter: TrainMeter, progress: Progress, epoch: int, every: int) -> None:
    """The progress bar every step; the reduced training loss in metrics.jsonl every `every` steps."""
    pos, cfg = run.state.position, run.cfg
    if not cadence.log_due(pos.global_step, pos.step, run.steps_per_epoch, run.total_steps, every):
        progress.update(epoch, run.epochs, None, meter.rate())
        return
    run.env.phase = f"reducing training metrics at step {pos.global_step}"
    loss, rate = meter.reduce()
    if not math.isfinite(loss):  # checked where the loss is read anyway: no extra host synchronisation
        lr = cfg.optim.lr
        raise ConfigError(f"training loss is {loss} by step {pos.global_step} (epoch {epoch + 1}): the run diverged "
                          f"with optim.lr={lr:g} and was stopped; rerun with a lower --optim.lr, e.g. {lr / 10:g} "
                          f"(or clip gradients: --optim.grad_clip 1)")
    run.metrics.write(event="train", epoch=epoch + 1, step=pos.global_step, loss=round(loss, 5),
                      lr=run.state.scheduler.get_last_lr()[0], img_s=round(rate, 1))
    progress.update(epoch, run.epochs, loss, rate)


def final_evaluation(run: Run, timer: Timer) -> dict:
    """The evaluation of the weights the run ends with: its last one when it is of this step, else a new one.

    A checkpoint of the last step can be older than that step's evaluation (a periodic or preemption
    checkpoint at the last step, then a rank lost during the evaluation): the restarted group, which has
    nothing left to train, evaluates those weights here, so that the run still reports their accuracy.
    """
    state, pos = run.state, run.state.position
    if state.history and state.history[-1].get("step") == pos.global_step:
        return state.history[-1]
    run.log.info(f"the weights of step {pos.global_step} have no evaluation yet: evaluating them now")
    epoch = pos.epoch - 1 if pos.step == 0 and pos.epoch > 0 else pos.epoch  # the epoch they were trained in
    return evaluate_now(run, epoch, None, time.perf_counter() - timer.start)


def evaluate_now(run: Run, epoch: int, epoch_img_s: float | None, wall_s: float) -> dict:
    """Exact evaluation of the EMA (or the model) on the test split; every rank gets the same result.
    `epoch_img_s` is None where this process trained nothing."""
    env, state = run.env, run.state
    env.phase = f"evaluating after epoch {epoch + 1}"
    faults.maybe("eval", env.rank, state.position.global_step)
    res = evaluate(state.eval_model, run.test_data, run.normalize, run.cfg.eval_batch, env.world, env.rank,
                   state.precision, run.cfg.tta_flip, lockstep=state.strategy.lockstep)
    res.update(epoch=epoch + 1, step=state.position.global_step, wall_s=round(wall_s, 2))
    if epoch_img_s is not None:
        res["train_img_s"] = round(epoch_img_s, 1)
    peak = state.accel.peak_memory_mb(env.device)
    if peak is not None:  # this rank's peak, training and evaluation included
        res["peak_mem_mb"] = peak
    graphs = state.accel.compiled_graphs()
    if graphs is not None:  # XLA: distinct graphs compiled so far; constant once every kind of step has run
        res["compiled_graphs"] = graphs
    check_ranks_hold_one_model(run, state.position.global_step)
    state.history.append(res)
    run.metrics.write(event="eval", **res)
    speed = f"{res['train_img_s']:,.0f} img/s  " if "train_img_s" in res else ""
    top5 = f"  top-5 {100 * res['top5']:.2f}%" if "top5" in res else ""
    run.log.info(f"epoch {epoch + 1}/{run.epochs}  test acc {100 * res['acc']:.2f}%{top5}  loss {res['loss']:.4f}  "
                 f"{speed}({res['wall_s']:.1f} s)")
    return res


def check_ranks_hold_one_model(run: Run, step: int) -> None:
    """Every rank must evaluate, save and export the same weights: compare their digests."""
    digests = ranks_holding(run.state.eval_model)
    if len(set(digests)) == 1:
        run.log.debug(f"step {step}: the {len(digests)} rank(s) hold one model (state {digests[0]})")
    else:  # a defect, not a user error: say so loudly, keep training
        run.log.error(f"step {step}: ranks hold different models (state digests by rank: {digests}); the "
                      f"evaluation mixes them and rank 0's copy is saved. Please report this.")


def save_checkpoint(run: Run, reason: str):
    """Every rank takes part (the RNG states are gathered). Rank 0 writes a replicated model alone; each
    rank writes its shards of a sharded one. Returns the directory on rank 0."""
    env, state = run.env, run.state
    env.phase = f"writing a checkpoint ({reason})"
    sd = state.state_dict()
    meta = dict(sd["state"], global_batch=run.cfg.global_batch, config=C.to_dict(run.cfg), reason=reason)
    if run.budget is not None:  # a resume continues this budget
        meta["budget_spent_s"] = round(run.budget.spent(), 3)
    root, step, keep = run.run_dir / "checkpoints", state.position.global_step, run.cfg.ckpt.keep
    path = None
    with rdist.rank0_alone(env):  # a replicated model's checkpoint is rank 0's alone: the others wait longer
        if state.strategy.sharded:
            from phalanx.train import sharded_checkpoint  # here: DCP's import (~0.3 s) is an FSDP run's alone
            path = sharded_checkpoint.save(root, step, sd["model"], sd["optim"], meta, sd["ema"], keep, env.rank)
        elif env.is_main and run.writer.enabled:  # --ckpt.async: a copy in host memory, written in the background
            t0 = time.perf_counter()
            model, optim, ema, meta = run.writer.stage((sd["model"], sd["optim"], sd["ema"], meta), env.accel.pin)
            env.accel.synchronize(env.device)  # the copies from the device have landed before the writer reads
            run.writer.submit(lambda: ckpt.save(root, step, model, optim, meta, ema, keep, env.rank), t0)
            path = root / ckpt.step_name(step)
        elif env.is_main:
            path = ckpt.save(root, step, sd["model"], sd["optim"], meta, sd["ema"], keep, env.rank)
        if env.is_main:
            staged = (f"; {1e3 * run.writer.blocked_s[-1]:.0f} ms to stage, written in the background"
                      if run.writer.enabled else "")
            run.log.info(f"checkpoint {path} ({reason}{staged})")
    return path


def stop_for_preemption(run: Run, epoch: int, signal_name: str) -> dict:
    path = save_checkpoint(run, f"preempted by {signal_name or 'a signal on another rank'}")
    run.writer.wait()  # sealed before the line below says so and the process exits
    run.log.info(f"preempted at epoch {epoch + 1}, step {run.state.position.step}: checkpoint "
                 f"{path or run.run_dir / 'checkpoints'} written; resume with `phalanx train --resume {run.run_dir}`"
                 f" (or start the same command again)")
    return {"preempted": True, "run_dir": str(run.run_dir), "global_step": run.state.position.global_step}
