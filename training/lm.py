"""Training loop for the character LSTM: truncated BPTT with the state carried across chunks."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from seqmodels.networks import LN2, AdaptConfig, CharLSTM, LMConfig, LSTMState, Vocab, bfloat16_units
from training import checkpoint
from training.checkpoint import Checkpointing, Preempted, Snapshot, run_identity
from training.distributed import Cluster, from_main, sum_over_processes


@dataclass(kw_only=True)
class LMTrainConfig:
    batch_size: int = 64  # parallel streams through the training text (on a GPU 256 won per minute)
    seq_len: int = 128  # truncated-BPTT window; the state is carried between windows
    max_steps: int = 30_000  # length of the learning-rate schedule and the hard cap on optimizer steps
    lr: float = 6e-3  # peak AdamW learning rate (chosen against 3e-3: docs/experiments.md)
    min_lr_ratio: float = 0.05  # cosine decay floor, as a fraction of `lr`
    warmup_steps: int = 100  # linear warm-up
    weight_decay: float = 0.1  # AdamW decay on matrices only
    grad_clip: float = 1.0  # global gradient-norm clip
    reset_prob: float = 0.02  # chance per stream and window of restarting from the start symbol
    eval_every: int = 500  # optimizer steps between validation passes
    eval_chars: int = 200_000  # validation characters used during training (the final figure uses all)
    patience: int = 10  # validation passes without improvement before early stop (6 stopped a GPU run too early)
    # 48 leaves the rest of the default run (dynamic evaluation, classifier) room in a 70-minute budget on
    # 2 cores; docs/training.md has the timings.
    max_minutes: float = 48.0  # wall-clock budget for the optimization loop; the schedule shrinks to fit it
    min_count: int = 5  # rarer training characters become U+FFFD
    autocast: str = "auto"  # bfloat16 autocast: "auto" (on where the CPU or GPU has bfloat16 units), "on", "off"
    ema_start: float = 0.5  # fraction of the schedule after which an average of the weights is kept
    ema_decay: float = 0.999  # per-step decay of that average; validation keeps whichever is better
    model: LMConfig = field(default_factory=LMConfig)


@dataclass(kw_only=True)
class LMHistory:
    steps: list[int] = field(default_factory=list)
    train_bpc: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_bpc: list[float] = field(default_factory=list)
    best_step: int = 0
    best_val_bpc: float = float("inf")
    best_kind: str = "weights"  # "weights", or "average" where the running average of the weights won
    stopped_by: str = "max_steps"
    seconds: float = 0.0  # of LM optimization, summed over the segments of a resumed run
    bfloat16_autocast: bool = False
    resumed_from: list[int] = field(default_factory=list)  # steps at which the run was resumed


def update_average(average: dict[str, torch.Tensor] | None, model: CharLSTM, decay: float) -> dict[str, torch.Tensor]:
    """Exponential moving average of the weights (float32), started from the current weights."""
    current = model.state_dict()
    if average is None:
        return {k: v.detach().clone().float() for k, v in current.items()}
    with torch.no_grad():
        for k, v in current.items():
            average[k].lerp_(v.detach().float(), 1 - decay)
    return average


def lr_at(step: int, cfg: LMTrainConfig, elapsed_fraction: float = 0.0) -> float:
    """Linear warm-up, then cosine decay over whichever runs out first: the steps or the time budget."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, max((step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps), elapsed_fraction))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: CharLSTM, cfg: LMTrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("embed")]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n.startswith("embed")]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99))


def stream_batches(
    ids: torch.Tensor,
    cfg: LMTrainConfig,
    bos: int,
    generator: torch.Generator,
    rows: slice | None = None,
    start_step: int = 0,
):
    """Endless (inputs, targets, reset_rows) windows over `batch_size` evenly spaced streams.

    Inputs are the targets shifted right by one, so consecutive windows continue each other
    and the carried state stays valid. A row marked for reset restarts from the zero state
    with the start symbol as its first input, which teaches the model to begin a text.

    `rows` takes one process's share of the streams: the windows and resets are those of the
    whole batch (every process draws the whole batch's resets from the same generator), so the
    processes of a distributed run together read exactly what one process reads. `start_step`
    continues at that window, with `generator` as it was after that many windows.
    """
    rows = rows if rows is not None else slice(0, cfg.batch_size)
    usable = (len(ids) - 1) // cfg.batch_size
    streams = ids[: usable * cfg.batch_size + 1]
    starts = (torch.arange(cfg.batch_size) * usable)[rows]
    windows = max(1, (usable - 1) // cfg.seq_len)  # per pass over the streams
    offset = 1 + (start_step % windows) * cfg.seq_len
    while True:
        if offset + cfg.seq_len > usable:
            offset = 1
        pos = starts[:, None] + offset + torch.arange(cfg.seq_len)[None, :]
        targets = streams[pos]
        inputs = streams[pos - 1]
        reset = (torch.rand(cfg.batch_size, generator=generator) < cfg.reset_prob)[rows]
        if offset == 1:
            reset[:] = True
        inputs[reset, 0] = bos
        yield inputs, targets, reset
        offset += cfg.seq_len


def use_bfloat16(setting: str, device: torch.device) -> bool:
    """bfloat16 autocast pays where the hardware has bfloat16 matrix units (AVX512-BF16 or AMX on CPUs)."""
    if setting != "auto":
        return setting == "on"
    return bfloat16_units(device) is not None


@torch.no_grad()
def evaluate_bpc(model: CharLSTM, ids: torch.Tensor, bos: int, segment_len: int = 8192, batch: int = 16) -> float:
    """Bits per character of `ids`, read in segments that each start from the start symbol."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nats, total_chars = 0.0, 0
    segments = [ids[i : i + segment_len] for i in range(0, len(ids), segment_len)]
    for i in range(0, len(segments), batch):
        group = segments[i : i + batch]
        length = max(len(s) for s in group)
        targets = torch.full((len(group), length), -1, dtype=torch.long)
        inputs = torch.zeros((len(group), length), dtype=torch.long)
        for row, seg in enumerate(group):
            targets[row, : len(seg)] = seg
            inputs[row, 0] = bos
            inputs[row, 1 : len(seg)] = seg[:-1]
        logits, _, _ = model(inputs.to(device))
        nats = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.to(device).reshape(-1), ignore_index=-1, reduction="sum"
        )
        total_nats += float(nats)
        total_chars += int((targets >= 0).sum())
    model.train(was_training)
    return total_nats / max(1, total_chars) / LN2


class StopRequests:
    """While active, SIGTERM only asks the loop to save a checkpoint and stop at the next step boundary.

    SIGINT (Ctrl-C) interrupts at once, as Python's own handler does, and is also remembered:
    a KeyboardInterrupt that lands in a finalizer or a callback is swallowed there, so the loop
    raises it again at the next step boundary (`check_interrupt`)."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self.requested = False
        self.interrupted = False
        self._previous: Any = None
        self._previous_sigint: Any = None

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True

    def _interrupt(self, signum: int, frame: object) -> None:
        self.interrupted = True
        raise KeyboardInterrupt

    def check_interrupt(self) -> None:
        if self.interrupted:
            raise KeyboardInterrupt

    def __enter__(self) -> StopRequests:
        main = threading.current_thread() is threading.main_thread()  # signal handlers can only go there
        if self.active:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        if main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored
            self._previous_sigint = signal.signal(signal.SIGINT, self._interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            signal.signal(signal.SIGTERM, self._previous)
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)


def _copy(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in weights.items()}


@dataclass(kw_only=True)
class _Loop:
    """What the training loop carries from step to step, and a checkpoint saves."""

    model: CharLSTM
    optimizer: torch.optim.AdamW
    generator: torch.Generator  # draws the streams' windows and resets
    state: LSTMState  # this process's rows of the carried LSTM state
    best: dict[str, torch.Tensor]  # the weights of the best validation pass so far
    average: dict[str, torch.Tensor] | None = None  # the running average of the weights, once started
    history: LMHistory = field(default_factory=LMHistory)
    step: int = 0  # optimizer steps taken
    since_best: int = 0  # validation passes without improvement
    seconds: float = 0.0  # training seconds so far, by rank 0's clock (shared after every step)
    finished: bool = False  # the loop had ended: a resumed run goes straight to the rest

    def snapshot(self, done: bool, cluster: Cluster, device: torch.device) -> Snapshot:
        return Snapshot(
            step=self.step,
            finished=done,
            since_best=self.since_best,
            seconds=self.seconds,
            history=asdict(self.history),
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            average=self.average,
            best=self.best,
            generator=self.generator.get_state(),
            carried=(self.state[0].detach().float(), self.state[1].detach().float()),
            rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            world_size=cluster.world_size,
        )

    def restore(self, snap: Snapshot, cluster: Cluster, seed: int, device: torch.device) -> None:
        """Continue from a checkpoint, possibly written by another number of processes."""
        self.model.load_state_dict(snap.model)
        self.optimizer.load_state_dict(snap.optimizer)
        self.average = {k: v.to(device) for k, v in snap.average.items()} if snap.average is not None else None
        self.best = {k: v.to(device) for k, v in snap.best.items()}
        self.generator.set_state(snap.generator)
        self.state = (snap.carried[0].to(device), snap.carried[1].to(device))
        if snap.rng is not None:
            torch.set_rng_state(snap.rng)
            if snap.cuda_rng is not None and device.type == "cuda":
                torch.cuda.set_rng_state(snap.cuda_rng, device)
        else:  # another number of processes: the old generators do not map onto the new ones
            torch.manual_seed(seed + cluster.rank + 7919 * snap.step)
        self.history = LMHistory(**snap.history)
        self.step, self.since_best, self.seconds, self.finished = (
            snap.step,
            snap.since_best,
            snap.seconds,
            snap.finished,
        )
        self.history.resumed_from.append(self.step)


def _validate(loop: _Loop, val_ids: torch.Tensor, bos: int) -> tuple[float, str]:
    """Rank 0's validation pass: the current weights and, once kept, their running average; the better one
    goes into the history, and becomes the best weights when it beats every earlier pass."""
    model = loop.model
    current = _copy(model.state_dict())
    candidates = [(evaluate_bpc(model, val_ids, bos, segment_len=2048, batch=64), "weights", current)]
    if loop.average is not None:
        model.load_state_dict(loop.average)
        candidates.append((evaluate_bpc(model, val_ids, bos, 2048, 64), "average", loop.average))
        model.load_state_dict(current)
    val_bpc, kind, weights = min(candidates, key=lambda c: c[0])
    history = loop.history
    history.val_steps.append(loop.step)
    history.val_bpc.append(val_bpc)
    if val_bpc < history.best_val_bpc:
        history.best_val_bpc, history.best_step, history.best_kind = val_bpc, loop.step, kind
        loop.since_best = 0
        loop.best = current if kind == "weights" else _copy(weights)  # the average goes on changing
    else:
        loop.since_best += 1
    return val_bpc, kind


def _start(
    train_text: str, cfg: LMTrainConfig, seed: int, device: torch.device, cluster: Cluster, rows: slice
) -> tuple[_Loop, Vocab]:
    """The vocabulary, and the loop's start: the same initial weights in every process, dropout of its own."""
    torch.manual_seed(seed)
    vocab = Vocab.from_text(train_text, cfg.min_count)
    model = CharLSTM(replace(cfg.model, vocab_size=vocab.size)).to(device)
    if cluster.rank:
        torch.manual_seed(seed + cluster.rank)
    loop = _Loop(
        model=model,
        optimizer=make_optimizer(model, cfg),
        generator=torch.Generator().manual_seed(seed),
        state=model.zero_state(rows.stop - rows.start, device),
        best=_copy(model.state_dict()),
    )
    return loop, vocab


def _optimizer_step(
    loop: _Loop,
    net: torch.nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    lr: float,
    grad_clip: float,
    bfloat16: bool,
    device: torch.device,
) -> torch.Tensor:
    """One step on a batch (inputs, targets, which streams restart): the carried state is cut where a stream
    restarts, the loss backpropagated through the window, the weights updated. Returns the loss."""
    inputs, targets, reset = batch
    keep = (~reset).to(device, torch.float32)[None, :, None]
    loop.state = (loop.state[0].detach().float() * keep, loop.state[1].detach().float() * keep)
    for group in loop.optimizer.param_groups:
        group["lr"] = lr
    # Master weights, the optimizer and the loss stay float32; only the matmuls run in bfloat16.
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bfloat16):
        _, loss, loop.state = net(
            inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True), loop.state
        )
    assert loss is not None
    loop.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(loop.model.parameters(), grad_clip)
    loop.optimizer.step()
    loop.step += 1
    return loss


@dataclass(kw_only=True)
class _Run:
    """What one call of `train_lm` works with besides the loop's state: its processes, where and when it
    saves checkpoints, and its clock."""

    cfg: LMTrainConfig
    cluster: Cluster
    device: torch.device
    checkpointing: Checkpointing | None
    identity: dict[str, Any]  # what a checkpoint must match to be continued (empty without checkpointing)
    started: float = 0.0  # time.monotonic() when this call's loop began
    seconds_before: float = 0.0  # training seconds of the run before this call (a resumed run's)
    saved_at: float = 0.0  # training seconds at the last checkpoint

    def begin(self, loop: _Loop) -> None:
        self.started, self.seconds_before, self.saved_at = time.monotonic(), loop.seconds, loop.seconds

    def clock(self) -> float:
        """Training seconds so far, by this process's clock."""
        return self.seconds_before + time.monotonic() - self.started

    def save(self, loop: _Loop, done: bool) -> Path:
        assert self.checkpointing is not None
        loop.history.seconds = loop.seconds
        snapshot = loop.snapshot(done, self.cluster, self.device)
        path = checkpoint.save(self.checkpointing, self.cluster, snapshot, self.identity)
        if self.cluster.main:
            tqdm.write(f"checkpoint: step {loop.step} saved in {path}")
        self.saved_at = loop.seconds
        return path


def _resume(loop: _Loop, run: _Run, rows: slice, seed: int) -> None:
    """Continue from the newest checkpoint where the run asks to resume and one matches."""
    resume_from = checkpoint.to_continue(run.checkpointing) if run.checkpointing is not None else None
    if resume_from is None:
        return
    snap = checkpoint.load(resume_from, run.cluster, rows, run.identity)
    loop.restore(snap, run.cluster, seed, run.device)
    if run.cluster.main:
        done = "its LM training had finished" if loop.finished else f"continuing at step {loop.step + 1}"
        if snap.world_size != run.cluster.world_size:
            done += f" (it was written by {snap.world_size} processes: state regathered, dropout reseeded)"
        print(f"resuming from {resume_from}: {done}", flush=True)


def _sum_step_over_processes(loop: _Loop, run: _Run, loss: torch.Tensor, stop_requested: bool) -> tuple[float, float]:
    """One exchange per step: the mean loss, rank 0's clock (which becomes everyone's), and whether any
    process got SIGTERM. Records the step's bits per character; returns them and the SIGTERM count."""
    clock = run.clock() if run.cluster.main else 0.0
    loss_sum, loop.seconds, stops = sum_over_processes(
        run.cluster, run.device, [loss.item(), clock, float(stop_requested)]
    )
    bpc = loss_sum / run.cluster.world_size / LN2
    loop.history.steps.append(loop.step)
    loop.history.train_bpc.append(bpc)
    return bpc, stops


def _loop_should_end(loop: _Loop, run: _Run, val_ids: torch.Tensor, bos: int, bpc: float, stops: float) -> bool:
    """After a step: validate when due, and say whether the loop ends (the last step, the time budget or
    early stopping). Saves a checkpoint when one is due, and on SIGTERM saves one and raises Preempted."""
    cfg, history = run.cfg, loop.history
    last_step = loop.step == cfg.max_steps
    out_of_time = loop.seconds / 60.0 >= cfg.max_minutes
    early_stop = False
    if loop.step % cfg.eval_every == 0 or last_step or out_of_time:
        if run.cluster.main:
            val_bpc, kind = _validate(loop, val_ids, bos)
            tqdm.write(f"step {loop.step}: train {bpc:.3f} bpc, validation {val_bpc:.3f} bpc ({kind})")
        early_stop = from_main(run.cluster, run.device, loop.since_best >= cfg.patience)
    if early_stop:
        history.stopped_by = "early_stopping"
    elif out_of_time:
        history.stopped_by = "time_budget"
    ending = early_stop or out_of_time or last_step
    if run.checkpointing is not None and stops > 0:
        path = run.save(loop, ending)
        raise Preempted(
            f"stopped by SIGTERM after step {loop.step} of {cfg.max_steps}; checkpoint in {path}. "
            "The same command with --resume continues the run; the previous artifacts are untouched"
        )
    due = run.checkpointing is not None and loop.seconds - run.saved_at >= run.checkpointing.minutes * 60.0
    if due and not ending:
        run.save(loop, False)
    return ending


def train_lm(
    train_text: str,
    val_text: str,
    cfg: LMTrainConfig,
    seed: int,
    device: torch.device,
    cluster: Cluster | None = None,
    checkpointing: Checkpointing | None = None,
) -> tuple[CharLSTM, Vocab, LMHistory]:
    """Train from scratch, or from the newest checkpoint where `checkpointing.resume`; returns the
    weights of the best validation pass (on rank 0: other processes return their last weights).

    Under torchrun each process trains on its rows of the total batch and DistributedDataParallel
    averages the gradients; rank 0 alone validates, keeps the best weights and the running average,
    and its clock decides the time budget, the learning rate and when to checkpoint, for all.
    """
    cluster = cluster or Cluster()
    rows = cluster.rows(cfg.batch_size)
    loop, vocab = _start(train_text, cfg, seed, device, cluster, rows)
    model = loop.model
    train_ids = torch.tensor(vocab.encode(train_text), dtype=torch.long)
    val_sample = val_text[: cfg.eval_chars]
    val_ids = torch.tensor(vocab.encode(val_sample), dtype=torch.long)
    identity = run_identity(asdict(cfg), seed, train_text, val_sample) if checkpointing is not None else {}
    run = _Run(cfg=cfg, cluster=cluster, device=device, checkpointing=checkpointing, identity=identity)
    _resume(loop, run, rows, seed)
    history = loop.history  # after _resume: a resumed run's own
    history.bfloat16_autocast = bfloat16 = use_bfloat16(cfg.autocast, device)
    net: torch.nn.Module = model
    if cluster.distributed:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    batches = stream_batches(train_ids, cfg, vocab.bos_id, loop.generator, rows, loop.step)
    run.begin(loop)
    steps = range(cfg.max_steps if loop.finished else loop.step, cfg.max_steps)
    bar = tqdm(steps, desc="lm", unit="step", mininterval=2.0, initial=loop.step, total=cfg.max_steps,
               disable=not cluster.main)  # fmt: skip
    with StopRequests(checkpointing is not None) as stop_requests, contextlib.closing(bar):
        for step in bar:
            stop_requests.check_interrupt()
            elapsed = loop.seconds / (cfg.max_minutes * 60.0)
            loss = _optimizer_step(loop, net, next(batches), lr_at(step, cfg, elapsed), cfg.grad_clip, bfloat16, device)
            if cluster.main and max(step / cfg.max_steps, elapsed) >= cfg.ema_start:
                loop.average = update_average(loop.average, model, cfg.ema_decay)
            bpc, stops = _sum_step_over_processes(loop, run, loss, stop_requests.requested)
            bar.set_postfix(bpc=f"{bpc:.3f}", val=f"{history.best_val_bpc:.3f}", refresh=False)
            if _loop_should_end(loop, run, val_ids, vocab.bos_id, bpc, stops):
                break
    if not loop.finished:
        loop.seconds = history.seconds = run.clock()  # the last validation pass included
        if checkpointing is not None:  # the rest of the run (evaluation, classifier) then needs no LM steps
            run.save(loop, True)
    if cluster.main:
        model.load_state_dict(loop.best)
    model.eval()
    return model.cpu(), vocab, history


def adapted_bpc(model: CharLSTM, documents: list[torch.Tensor], bos: int, adapt: AdaptConfig) -> float:
    """Bits per character with dynamic evaluation: each document read as one text from the start
    symbol, on its own fresh copy of the weights (as `/v1/score` with `adapt` does per text).

    On the CPU the documents are shared out over one Python thread per core, each running its
    operators on one core: a batch-1 step is too small to split across cores, while independent
    documents keep all of them busy (docs/training.md compares the two)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device

    def document_nats(ids: torch.Tensor) -> float:
        inputs = torch.cat([torch.tensor([bos]), ids[:-1]])[None].to(device)
        return -float(model.adapted_logprobs(inputs, ids[None].to(device), adapt).sum())

    workers = torch.get_num_threads() if device.type == "cpu" else 1
    longest_first = sorted(documents, key=len, reverse=True)  # fewer stragglers at the end
    if workers > 1 and len(documents) > 1:
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                nats = list(pool.map(document_nats, longest_first))
        finally:
            torch.set_num_threads(workers)
    else:
        nats = [document_nats(ids) for ids in longest_first]
    model.train(was_training)
    return sum(nats) / max(1, sum(len(ids) for ids in documents)) / LN2


def tune_adaptation(
    model: CharLSTM, documents: list[torch.Tensor], bos: int, lrs: list[float], segments: list[int]
) -> tuple[AdaptConfig, list[dict[str, float]]]:
    """The learning rate, then the segment length, that give the lowest validation bits per character;
    returns the choice and every trial. A rate of 0 (no adaptation) is always a candidate."""
    trials: list[dict[str, float]] = []

    def trial(lr: float, segment_len: int) -> float:
        bpc = adapted_bpc(model, documents, bos, AdaptConfig(lr=lr, segment_len=segment_len))
        trials.append({"lr": lr, "segment_len": segment_len, "val_bpc": bpc})
        print(f"adaptation lr {lr:g}, segment {segment_len}: validation {bpc:.4f} bpc")
        return bpc

    first = segments[0]
    by_lr = {lr: trial(lr, first) for lr in [0.0, *lrs]}
    best_lr = min(by_lr, key=by_lr.__getitem__)
    if best_lr == 0.0:
        return AdaptConfig(), trials
    by_segment = {first: by_lr[best_lr]} | {n: trial(best_lr, n) for n in segments[1:]}
    best_segment = min(by_segment, key=by_segment.__getitem__)
    return AdaptConfig(lr=best_lr, segment_len=best_segment), trials
