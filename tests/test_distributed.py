"""Training under torchrun (2 processes, gloo on the CPU), checkpoints, and continuing a stopped run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqmodels.artifacts import load_artifacts
from tests.conftest import REPO, TINY_TRAIN_ARGS
from training import lm as lm_module
from training import run as training_run
from training.checkpoint import CheckpointError, Checkpointing, Preempted, checkpoints
from training.distributed import Cluster, LaunchError
from training.flags import config_from
from training.lm import LMTrainConfig, stream_batches, train_lm

# The tiny run on the CPU, made cheaper after the LM: no adaptation trials, no cross-validation.
FAST_TAIL = ["--adapt-lrs", "--cv-folds", "1", "--device", "cpu"]  # gloo, also on a machine with a GPU
NO_DROPOUT = [
    "--dropout", "0", "--input-dropout", "0", "--hidden-dropout", "0", "--weight-dropout", "0",
    "--embed-dropout", "0", "--autocast", "off",
]  # fmt: skip
LIMIT = 180  # seconds for one torchrun of the tiny run, on a busy 2-core machine


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "training.run",
            *args]  # fmt: skip


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def texts(corpus: Path, seed: int) -> tuple[str, str]:
    docs, split = training_run.split_or_chunk(training_run.load_corpus([corpus])[0], seed)
    return training_run.join(docs, split.train), training_run.join(docs, split.validation)


def tiny_config(*extra: str) -> LMTrainConfig:
    config: LMTrainConfig = config_from(training_run.parse_args([*TINY_TRAIN_ARGS, *extra]), LMTrainConfig)
    return config


# --------------------------------------------------------------------------- data of each process


def test_processes_share_the_one_process_batch() -> None:
    cfg = LMTrainConfig(batch_size=8, seq_len=16, reset_prob=0.3)
    ids = torch.randint(0, 50, (5000,))
    whole = stream_batches(ids, cfg, 99, torch.Generator().manual_seed(3))
    halves = [
        stream_batches(ids, cfg, 99, torch.Generator().manual_seed(3), Cluster(rank=r, world_size=2).rows(8))
        for r in (0, 1)
    ]
    for _ in range(30):  # past the end of the streams, where every row restarts
        inputs, targets, reset = next(whole)
        parts = [next(h) for h in halves]
        for i, part in enumerate((inputs, targets, reset)):
            assert torch.equal(part, torch.cat([p[i] for p in parts]))
    generator = torch.Generator().manual_seed(3)
    from_start = stream_batches(ids, cfg, 99, generator)
    for _ in range(12):
        next(from_start)
    state = generator.get_state()
    continued = stream_batches(ids, cfg, 99, torch.Generator().set_state(state), start_step=12)
    for _ in range(20):
        expected = next(from_start)
        assert all(torch.equal(a, b) for a, b in zip(next(continued), expected, strict=True))
    with pytest.raises(LaunchError, match="multiple of the 3 processes"):
        Cluster(rank=0, world_size=3).rows(8)


# --------------------------------------------------------------------------- torchrun, 2 processes


def test_two_processes_write_loadable_artifacts_equal_to_one(tmp_path: Path, tiny_corpus: Path) -> None:
    """Without dropout, 2 processes of 4 streams train what 1 process of 8 streams does."""
    out = tmp_path / "artifacts"
    args = ["--corpus", str(tiny_corpus), "--out", str(out), *TINY_TRAIN_ARGS, *FAST_TAIL, *NO_DROPOUT]
    done = subprocess.run(torchrun(*args), cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=LIMIT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("wrote ") == 1  # rank 0 alone reports and writes
    models = load_artifacts(out)
    training = models.manifest["training"]
    assert (training["world_size"], training["backend"], training["resumed_from_steps"]) == (2, "gloo", [])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lm"]["steps"] == 40

    lm, _, history = train_lm(*texts(tiny_corpus, 7), tiny_config(*NO_DROPOUT), 7, torch.device("cpu"))
    assert history.best_step == metrics["lm"]["best_step"]
    one, two = lm.state_dict(), models.lm.state_dict()
    for key in one:  # the same up to the order of floating-point sums
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5, msg=key)


def test_a_killed_two_process_run_resumes_to_the_same_step_count(tmp_path: Path, tiny_corpus: Path) -> None:
    out, saved = tmp_path / "artifacts", tmp_path / "checkpoints"
    args = ["--corpus", str(tiny_corpus), "--out", str(out), *TINY_TRAIN_ARGS, *FAST_TAIL, "--max-steps", "100"]
    args += ["--checkpoint-dir", str(saved)]
    proc = subprocess.Popen(
        torchrun(*args, "--checkpoint-minutes", "0"),  # a checkpoint after every step
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # a preemption: torchrun gets SIGTERM once the run has a checkpoint
        seen.append(line)
        if "checkpoint: step" in line:
            proc.send_signal(signal.SIGTERM)
            break
    output = "".join(seen) + proc.communicate(timeout=LIMIT)[0]
    assert proc.returncode != 0, output
    stopped = re.findall(r"stopped by SIGTERM after step (\d+) of 100", output)
    assert len(stopped) == 1, output  # said once, by rank 0
    step = int(stopped[0])
    assert 0 < step < 100
    assert checkpoints(saved)[-1].name == f"step-{step:08d}"
    assert sorted(p.name for p in checkpoints(saved)[-1].iterdir()) == [
        "rank-0.safetensors", "rank-1.safetensors", "state.json", "state.safetensors",
    ]  # fmt: skip
    assert not out.exists()  # artifacts are only ever written at the end

    done = subprocess.run(
        torchrun(*args, "--resume"), cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=LIMIT
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"continuing at step {step + 1}" in done.stdout
    models = load_artifacts(out)
    assert models.manifest["training"]["resumed_from_steps"] == [step]
    assert json.loads((out / "metrics.json").read_text())["lm"]["steps"] == 100
    history = json.loads((out / "history.json").read_text())["lm"]
    assert history["steps"] == list(range(1, 101))  # the history goes on: no restart from step 0
    assert history["val_steps"] == [20, 40, 60, 80, 100]


# --------------------------------------------------------------------------- checkpoints, one process


def test_a_resumed_run_trains_exactly_what_an_uninterrupted_one_does(
    tmp_path: Path, tiny_corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train_text, val_text = texts(tiny_corpus, 7)
    cpu = torch.device("cpu")
    whole, _, whole_history = train_lm(train_text, val_text, tiny_config(), 7, cpu)

    lr_at = lm_module.lr_at

    def sigterm_at_step_25(step: int, cfg: LMTrainConfig, elapsed: float = 0.0) -> float:
        if step == 24:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the loop: it saves after this step and stops
        return lr_at(step, cfg, elapsed)

    saving = Checkpointing(tmp_path / "checkpoints", minutes=60.0)
    handler = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        patch.setattr(lm_module, "lr_at", sigterm_at_step_25)
        with pytest.raises(Preempted, match="after step 25 of 40"):
            train_lm(train_text, val_text, tiny_config(), 7, cpu, checkpointing=saving)
    assert signal.getsignal(signal.SIGTERM) == handler  # the loop's handler is gone with the loop
    assert [p.name for p in checkpoints(saving.folder)] == ["step-00000025"]

    saving.resume = True
    resumed, _, history = train_lm(train_text, val_text, tiny_config(), 7, cpu, checkpointing=saving)
    assert history.resumed_from == [25]
    assert (history.steps, history.train_bpc, history.val_bpc) == (
        whole_history.steps, whole_history.train_bpc, whole_history.val_bpc,
    )  # fmt: skip
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert [p.name for p in checkpoints(saving.folder)] == ["step-00000025", "step-00000040"]

    # Continued once more, the finished checkpoint gives the same weights without training.
    again, _, history = train_lm(train_text, val_text, tiny_config(), 7, cpu, checkpointing=saving)
    assert history.resumed_from == [25, 40]
    assert all(torch.equal(again.state_dict()[k], v) for k, v in whole.state_dict().items())


def test_checkpoints_of_another_run_are_refused(
    tmp_path: Path, tiny_corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train_text, val_text = texts(tiny_corpus, 7)
    cpu = torch.device("cpu")
    saving = Checkpointing(tmp_path / "checkpoints")
    train_lm(train_text, val_text, tiny_config("--max-steps", "2"), 7, cpu, checkpointing=saving)
    with pytest.raises(CheckpointError, match=r"already holds checkpoints.*pass --resume"):
        train_lm(train_text, val_text, tiny_config("--max-steps", "2"), 7, cpu, checkpointing=saving)
    saving.resume = True
    with pytest.raises(CheckpointError, match=r"model\.hidden_size 32 there, 48 here"):
        train_lm(train_text, val_text, tiny_config("--hidden-size", "48"), 7, cpu, checkpointing=saving)
    with pytest.raises(CheckpointError, match="another corpus"):
        train_lm(train_text[1:], val_text, tiny_config("--max-steps", "2"), 7, cpu, checkpointing=saving)

    out = tmp_path / "artifacts"
    args = ["--corpus", str(tiny_corpus), "--out", str(out), *TINY_TRAIN_ARGS, "--checkpoint-dir", str(saving.folder)]
    assert training_run.cli(args) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert not out.exists()
