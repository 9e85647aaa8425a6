"""Training loop for the character LSTM: truncated BPTT with the state carried across chunks."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from seqmodels.networks import AdaptConfig, CharLSTM, LMConfig, Vocab

LN2 = math.log(2.0)


@dataclass
class LMTrainConfig:
    batch_size: int = 64  # parallel streams through the training text (on a GPU 256 won per minute)
    seq_len: int = 128  # truncated-BPTT window; the state is carried between windows
    max_steps: int = 30_000  # length of the learning-rate schedule and the hard cap on optimizer steps
    lr: float = 3e-3  # peak AdamW learning rate
    min_lr_ratio: float = 0.05  # cosine decay floor, as a fraction of `lr`
    warmup_steps: int = 100  # linear warm-up
    weight_decay: float = 0.1  # AdamW decay on matrices only
    grad_clip: float = 1.0  # global gradient-norm clip
    reset_prob: float = 0.02  # chance per stream and window of restarting from the start symbol
    eval_every: int = 500  # optimizer steps between validation passes
    eval_chars: int = 200_000  # validation characters used during training (the final figure uses all)
    patience: int = 10  # validation passes without improvement before early stop (6 stopped a GPU run at 22 %)
    max_minutes: float = 42.0  # wall-clock budget for the optimization loop; the schedule shrinks to fit it
    min_count: int = 5  # rarer training characters become U+FFFD
    autocast: str = "auto"  # bfloat16 autocast: "auto" (on where the CPU or GPU has bfloat16 units), "on", "off"
    ema_start: float = 0.5  # fraction of the schedule after which an average of the weights is kept
    ema_decay: float = 0.999  # per-step decay of that average; validation keeps whichever is better
    model: LMConfig = field(default_factory=LMConfig)


@dataclass
class LMHistory:
    steps: list[int] = field(default_factory=list)
    train_bpc: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_bpc: list[float] = field(default_factory=list)
    best_step: int = 0
    best_val_bpc: float = float("inf")
    best_kind: str = "weights"  # "weights", or "average" where the running average of the weights won
    stopped_by: str = "max_steps"
    seconds: float = 0.0
    bfloat16_autocast: bool = False


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


def stream_batches(ids: torch.Tensor, cfg: LMTrainConfig, bos: int, generator: torch.Generator):
    """Endless (inputs, targets, reset_rows) windows over `batch_size` evenly spaced streams.

    Inputs are the targets shifted right by one, so consecutive windows continue each other
    and the carried state stays valid. A row marked for reset restarts from the zero state
    with the start symbol as its first input, which teaches the model to begin a text.
    """
    usable = (len(ids) - 1) // cfg.batch_size
    streams = ids[: usable * cfg.batch_size + 1]
    starts = torch.arange(cfg.batch_size) * usable
    offset = 1
    while True:
        if offset + cfg.seq_len > usable:
            offset = 1
        pos = starts[:, None] + offset + torch.arange(cfg.seq_len)[None, :]
        targets = streams[pos]
        inputs = streams[pos - 1]
        reset = torch.rand(cfg.batch_size, generator=generator) < cfg.reset_prob
        if offset == 1:
            reset[:] = True
        inputs[reset, 0] = bos
        yield inputs, targets, reset
        offset += cfg.seq_len


def use_bfloat16(setting: str, device: torch.device) -> bool:
    """bfloat16 autocast pays where the hardware has bfloat16 matrix units (AVX512-BF16 or AMX on CPUs)."""
    if setting != "auto":
        return setting == "on"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


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


def train_lm(
    train_text: str,
    val_text: str,
    cfg: LMTrainConfig,
    seed: int,
    device: torch.device,
) -> tuple[CharLSTM, Vocab, LMHistory]:
    """Train from scratch; returns the weights of the best validation pass."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    vocab = Vocab.from_text(train_text, cfg.min_count)
    cfg.model.vocab_size = vocab.size
    model = CharLSTM(cfg.model).to(device)
    optimizer = make_optimizer(model, cfg)
    train_ids = torch.tensor(vocab.encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(vocab.encode(val_text[: cfg.eval_chars]), dtype=torch.long)
    batches = stream_batches(train_ids, cfg, vocab.bos_id, generator)

    history = LMHistory()
    bfloat16 = use_bfloat16(cfg.autocast, device)
    history.bfloat16_autocast = bfloat16
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    average: dict[str, torch.Tensor] | None = None
    state = model.zero_state(cfg.batch_size, device)
    started = time.monotonic()
    since_best = 0
    bar = tqdm(range(cfg.max_steps), desc="lm", unit="step", mininterval=2.0)
    for step in bar:
        inputs, targets, reset = next(batches)
        keep = (~reset).to(device, torch.float32)[None, :, None]
        state = (state[0].detach().float() * keep, state[1].detach().float() * keep)
        elapsed = (time.monotonic() - started) / 60.0 / cfg.max_minutes
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg, elapsed)
        # Master weights, the optimizer and the loss stay float32; only the matmuls run in bfloat16.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bfloat16):
            _, loss, state = model(inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True), state)
        assert loss is not None
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if max(step / cfg.max_steps, elapsed) >= cfg.ema_start:
            average = update_average(average, model, cfg.ema_decay)

        bpc = loss.item() / LN2
        history.steps.append(step + 1)
        history.train_bpc.append(bpc)
        bar.set_postfix(loss=f"{loss.item():.3f}", bpc=f"{bpc:.3f}", val=f"{history.best_val_bpc:.3f}", refresh=False)

        last_step = step + 1 == cfg.max_steps
        out_of_time = (time.monotonic() - started) / 60.0 >= cfg.max_minutes
        if (step + 1) % cfg.eval_every == 0 or last_step or out_of_time:
            val_bpc = evaluate_bpc(model, val_ids, vocab.bos_id, segment_len=2048, batch=64)
            candidates = [(val_bpc, "weights", {k: v.detach().clone() for k, v in model.state_dict().items()})]
            if average is not None:
                current = {k: v.detach().clone() for k, v in model.state_dict().items()}
                model.load_state_dict(average)
                candidates.append((evaluate_bpc(model, val_ids, vocab.bos_id, 2048, 64), "average", average))
                model.load_state_dict(current)
            val_bpc, kind, weights = min(candidates, key=lambda c: c[0])
            history.val_steps.append(step + 1)
            history.val_bpc.append(val_bpc)
            if val_bpc < history.best_val_bpc:
                history.best_val_bpc, history.best_step, since_best = val_bpc, step + 1, 0
                history.best_kind = kind
                best_state = {k: v.detach().clone() for k, v in weights.items()}
            else:
                since_best += 1
            tqdm.write(f"step {step + 1}: train {bpc:.3f} bpc, validation {val_bpc:.3f} bpc ({kind})")
            if since_best >= cfg.patience:
                history.stopped_by = "early_stopping"
                break
        if out_of_time:
            history.stopped_by = "time_budget"
            break
    bar.close()
    history.seconds = time.monotonic() - started
    model.load_state_dict(best_state)
    model.eval()
    return model.cpu(), vocab, history


def adapted_bpc(model: CharLSTM, documents: list[torch.Tensor], bos: int, adapt: AdaptConfig) -> float:
    """Bits per character with dynamic evaluation: each document read as one text from the start
    symbol, on its own fresh copy of the weights (as `/v1/score` with `adapt` does per text)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nats, total_chars = 0.0, 0
    for ids in documents:
        inputs = torch.cat([torch.tensor([bos]), ids[:-1]])[None].to(device)
        logprobs = model.adapted_logprobs(inputs, ids[None].to(device), adapt)
        total_nats -= float(logprobs.sum())
        total_chars += len(ids)
    model.train(was_training)
    return total_nats / max(1, total_chars) / LN2


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
    best_lr = min([0.0, *lrs], key=lambda lr: trial(lr, first))
    if best_lr == 0.0:
        return AdaptConfig(), trials
    scored = {first: min(t["val_bpc"] for t in trials if t["lr"] == best_lr)}
    for n in segments[1:]:
        scored[n] = trial(best_lr, n)
    best_segment = min(scored, key=lambda n: scored[n])
    return AdaptConfig(lr=best_lr, segment_len=best_segment), trials
