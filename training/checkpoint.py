"""Checkpoints of the LM's training, so that a stopped or preempted run continues where it was.

A checkpoint is a folder `step-NNNNNNNN` in the checkpoint folder, made under a temporary name and
renamed into place once complete (a crash leaves either the whole checkpoint or none of it):

- `state.safetensors`: what every process shares: the weights, AdamW's moments, the running average
  of the weights, the best weights so far, and the data order's random generator;
- `rank-R.safetensors`: what is each process's own: its rows of the LSTM state carried between
  windows and its random generators (its dropout masks);
- `state.json`: the step, the history, the early-stopping count, the training seconds so far,
  AdamW's settings, and what identifies the run (its options and a hash of its text).

Tensors are safetensors and the rest JSON: nothing is pickled. Rank 0 writes the shared files and
commits the folder; under torchrun on several nodes the folder must be shared storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from training.distributed import Cluster, barrier

FORMAT = 1
PREFIX = "step-"
KEEP = 2  # the newest complete checkpoints kept; older ones are deleted once a new one is in place
UNCHECKED = ("max_minutes",)  # options a resumed run may change: a longer or shorter time budget


class CheckpointError(Exception):
    """A checkpoint folder that does not fit this run, or a run that would mix two runs' checkpoints."""


class Preempted(Exception):
    """The run stopped on SIGTERM after saving a checkpoint; the same command with --resume continues it."""


@dataclass
class Checkpointing:
    folder: Path
    minutes: float = 5.0  # training minutes between checkpoints; 0 saves after every step
    resume: bool = False


@dataclass(kw_only=True)
class Snapshot:
    """The loop's whole state after `step` optimizer steps."""

    step: int
    finished: bool  # the loop had ended (steps, time budget or early stopping): only the rest of the run is left
    since_best: int
    seconds: float  # training seconds so far, all earlier segments included
    history: dict[str, Any]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    average: dict[str, torch.Tensor] | None
    best: dict[str, torch.Tensor]
    generator: torch.Tensor
    carried: tuple[torch.Tensor, torch.Tensor]  # this process's rows of the carried LSTM state
    rng: torch.Tensor | None  # this process's CPU generator; None where the world size changed
    cuda_rng: torch.Tensor | None
    world_size: int  # of the run that wrote it


def run_identity(config: dict[str, Any], seed: int, train_text: str, val_text: str) -> dict[str, Any]:
    """What a checkpoint must match to be continued: the LM's options, the seed and the text."""
    digest = hashlib.sha256()
    for text in (train_text, val_text):
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return {"config": json.loads(json.dumps(config)), "seed": seed, "text_sha256": digest.hexdigest()}


def _cpu(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def _unprefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def save(settings: Checkpointing, cluster: Cluster, snapshot: Snapshot, identity: dict[str, Any]) -> Path:
    """Every process calls this at the same step; returns the committed folder."""
    folder = settings.folder
    final = folder / f"{PREFIX}{snapshot.step:08d}"
    partial = folder / f".partial-{snapshot.step:08d}"
    if cluster.main:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".partial-*"):
            shutil.rmtree(stale)
        partial.mkdir()
    barrier(cluster)
    own = {"carried.h": snapshot.carried[0], "carried.c": snapshot.carried[1]}
    if snapshot.rng is not None:
        own["rng"] = snapshot.rng
    if snapshot.cuda_rng is not None:
        own["cuda_rng"] = snapshot.cuda_rng
    rank_file = partial / f"rank-{cluster.rank}.safetensors"
    save_file(_cpu(own, ""), str(rank_file))
    _fsync(rank_file)
    barrier(cluster)
    if cluster.main:
        opt_tensors, opt_json = _flatten_optimizer(snapshot.optimizer)
        shared = {
            **_cpu(snapshot.model, "model."),
            **_cpu(snapshot.best, "best."),
            **(_cpu(snapshot.average, "average.") if snapshot.average is not None else {}),
            **_cpu(opt_tensors, "optimizer."),
            "generator": snapshot.generator.clone(),
        }
        save_file(shared, str(partial / "state.safetensors"))
        meta = {
            "format": FORMAT,
            "step": snapshot.step,
            "finished": snapshot.finished,
            "since_best": snapshot.since_best,
            "seconds": snapshot.seconds,
            "world_size": cluster.world_size,
            "has_average": snapshot.average is not None,
            "optimizer": opt_json,
            "history": snapshot.history,
            "run": identity,
        }
        (partial / "state.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        for path in partial.iterdir():
            _fsync(path)
        _fsync(partial)
        if final.exists():  # the same step saved again (the end of a run that was just checkpointed)
            old = folder / f".partial-old-{snapshot.step:08d}"
            os.replace(final, old)
            os.replace(partial, final)
            shutil.rmtree(old)
        else:
            os.replace(partial, final)
        _fsync(folder)
        for older in checkpoints(folder)[:-KEEP]:
            shutil.rmtree(older)
    barrier(cluster)
    return final


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def check_identity(path: Path, saved: dict[str, Any], identity: dict[str, Any]) -> None:
    differences = []
    if saved["seed"] != identity["seed"]:
        differences.append(f"--seed {saved['seed']} there, {identity['seed']} here")
    if saved["text_sha256"] != identity["text_sha256"]:
        differences.append("another corpus or split (the training and validation text differ)")

    def flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in config.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            elif key not in UNCHECKED:
                out[prefix + key] = value
        return out

    there, here = flat(saved["config"]), flat(identity["config"])
    for key in sorted(there.keys() | here.keys()):
        if there.get(key) != here.get(key):
            differences.append(f"{key} {there.get(key)} there, {here.get(key)} here")
    if differences:
        raise CheckpointError(
            f"checkpoint {path} is from another run: {'; '.join(differences)}. "
            "Use the options of that run, or another --checkpoint-dir to start afresh"
        )


def load(path: Path, cluster: Cluster, rows: slice, identity: dict[str, Any]) -> Snapshot:
    """The checkpoint at `path` as this process continues it (its own rows of the carried state)."""
    meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')}; this code reads {FORMAT}")
    check_identity(path, meta["run"], identity)
    shared = load_file(str(path / "state.safetensors"))
    same_world = meta["world_size"] == cluster.world_size
    if same_world:
        own = load_file(str(path / f"rank-{cluster.rank}.safetensors"))
        carried = (own["carried.h"], own["carried.c"])
        rng, cuda_rng = own.get("rng"), own.get("cuda_rng")
    else:  # another number of processes: reassemble the whole batch's state and take this process's rows
        parts = [load_file(str(path / f"rank-{r}.safetensors")) for r in range(meta["world_size"])]
        carried = (
            torch.cat([p["carried.h"] for p in parts], dim=1)[:, rows].contiguous(),
            torch.cat([p["carried.c"] for p in parts], dim=1)[:, rows].contiguous(),
        )
        rng = cuda_rng = None
    return Snapshot(
        step=meta["step"],
        finished=meta["finished"],
        since_best=meta["since_best"],
        seconds=meta["seconds"],
        history=meta["history"],
        model=_unprefix(shared, "model."),
        optimizer=_unflatten_optimizer(_unprefix(shared, "optimizer."), meta["optimizer"]),
        average=_unprefix(shared, "average.") if meta["has_average"] else None,
        best=_unprefix(shared, "best."),
        generator=shared["generator"],
        carried=carried,
        rng=rng,
        cuda_rng=cuda_rng,
        world_size=meta["world_size"],
    )


def to_continue(settings: Checkpointing) -> Path | None:
    """The checkpoint this run continues from (None: start afresh), or an error where that is ambiguous."""
    found = checkpoints(settings.folder)
    if found and not settings.resume:
        raise CheckpointError(
            f"{settings.folder} already holds checkpoints of a run (newest {found[-1].name}); "
            "pass --resume to continue it, or choose an empty --checkpoint-dir"
        )
    return found[-1] if found else None
