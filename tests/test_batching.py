"""Continuous batching: the fused step, batched against unbatched output, joining, leaving and failures."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flask import Flask

from benchmarks.precision import heldout_bpc
from seqmodels.artifacts import LoadedModels, load_artifacts
from seqmodels.networks import CharLSTM, LMConfig
from service import lifecycle
from service.api.sse import sse_response
from service.engine.decode_batch import DecodeBatch
from service.engine.engine import Engine, EngineOptions, Generation
from service.engine.jobs import merge_deltas
from service.engine.lstm_kernels import FusedStep, PackedLinear
from service.engine.sampling import SamplingParams
from service.engine.scheduler import Scheduler
from service.engine.types import Delta, GenerationRequest, TokenScore
from training.corpus import load_plays
from training.evaluation import EVAL_SEGMENT
from training.lm import evaluate_bpc

pytestmark = pytest.mark.unit  # no server: `pytest -m unit` runs these in about a minute


@pytest.fixture(scope="module")
def models(tiny_artifacts: Path) -> LoadedModels:
    return load_artifacts(tiny_artifacts)


@pytest.fixture()
def batched(models: LoadedModels) -> Engine:
    return Engine(models, EngineOptions(batching=True, max_batch_rows=64))


@pytest.fixture(scope="module")
def alone(models: LoadedModels) -> Engine:
    return Engine(models, EngineOptions(batching=False))


REQUESTS = [
    GenerationRequest(prompt="To be", max_tokens=60, params=SamplingParams(temperature=1.0), seed=1, n=3),
    GenerationRequest(prompt="", max_tokens=45, params=SamplingParams(temperature=0.7, top_k=5), seed=2, stop=["e "]),
    GenerationRequest(
        prompt="Hark! who goes there?", max_tokens=80, params=SamplingParams(temperature=1.2, top_p=0.9), seed=3, n=2
    ),
    GenerationRequest(prompt="a", max_tokens=30, params=SamplingParams(temperature=0.0)),
    GenerationRequest(
        prompt="My lord",
        max_tokens=50,
        params=SamplingParams(presence_penalty=0.5, frequency_penalty=0.3),
        seed=4,
        top_logprobs=3,
    ),
    GenerationRequest(prompt="O", max_tokens=70, params=SamplingParams(), seed=5, n=4),
]


@pytest.fixture(scope="module", params=["trained", "two-layer"])
def lm(request: pytest.FixtureRequest, models: LoadedModels) -> CharLSTM:
    """The tiny trained model (one layer), and an untrained two-layer one for the upper layers' path."""
    if request.param == "trained":
        return models.lm
    torch.manual_seed(0)
    return CharLSTM(LMConfig(vocab_size=20, embed_dim=8, hidden_size=24, num_layers=2)).eval()


def test_fused_step_matches_nn_lstm(lm: CharLSTM) -> None:
    kernel = FusedStep(lm)
    generator = torch.Generator().manual_seed(0)
    layers, hidden = lm.config.num_layers, lm.config.hidden_size
    with torch.inference_mode():
        for batch in (1, 7):
            ids = torch.randint(0, lm.config.vocab_size + 1, (batch,), generator=generator)
            h = torch.randn(layers, batch, hidden, generator=generator)
            c = torch.randn(layers, batch, hidden, generator=generator)
            expected, (h_ref, c_ref) = lm.step(ids, (h.clone(), c.clone()))
            logits = kernel(ids, h, c)
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(c, c_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("lengths", [[1], [7, 7, 7], [1, 60, 5, 300, 60], [270, 2]])
def test_prefill_matches_nn_lstm_on_each_sequence_alone(lm: CharLSTM, lengths: list[int], onednn: bool) -> None:
    """oneDNN on prepacked weights (rows joining at different steps, across the chunk boundary),
    and the fallback without it."""
    kernel = FusedStep(lm)
    assert kernel.rnn_layers is not None
    if not onednn:
        kernel.rnn_layers = None
    generator = torch.Generator().manual_seed(sum(lengths))
    sequences = [torch.randint(0, lm.config.vocab_size + 1, (n,), generator=generator).tolist() for n in lengths]
    with torch.inference_mode():
        logits, (h, c) = kernel.prefill(sequences)
        for row, sequence in enumerate(sequences):
            expected, (h_ref, c_ref) = lm.prefill([sequence])
            torch.testing.assert_close(logits[row], expected[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(h[:, row], h_ref[:, 0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(c[:, row], c_ref[:, 0], rtol=1e-5, atol=1e-5)


def test_packed_linear_matches_addmm_and_rows_do_not_depend_on_each_other() -> None:
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 40, generator=generator), torch.randn(96, generator=generator)
    x = torch.randn(33, 40, generator=generator)
    linear = PackedLinear(weight, bias)
    assert linear.uses_onednn  # the path the service runs on; the fallback is tested below
    together = linear(x)
    torch.testing.assert_close(together, torch.addmm(bias, x, weight.t()), rtol=1e-5, atol=1e-5)
    for rows in (slice(0, 1), slice(5, 8), slice(1, 33)):
        assert torch.equal(linear(x[rows]), together[rows])  # so batched decoding equals unbatched decoding


def test_packed_linear_falls_back_to_addmm_without_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(*args: Any) -> torch.Tensor:
        raise RuntimeError("no oneDNN in this build")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", missing)
    weight, bias, x = torch.randn(8, 5), torch.randn(8), torch.randn(3, 5)
    linear = PackedLinear(weight, bias)
    assert not linear.uses_onednn
    torch.testing.assert_close(linear(x), torch.addmm(bias, x, weight.t()))


def run_concurrently(engine: Engine, requests: list[GenerationRequest]) -> list[Generation]:
    results: list[Generation | None] = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def one(i: int) -> None:
        start.wait()
        results[i] = engine.generate(requests[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def test_batched_output_equals_unbatched_output(batched: Engine, alone: Engine) -> None:
    together = run_concurrently(batched, REQUESTS)
    assert batched.scheduler is not None and batched.scheduler.max_batch_seen > 4  # they really shared steps
    for req, shared in zip(REQUESTS, together, strict=True):
        single = alone.generate(req)
        for a, b in zip(shared.choices, single.choices, strict=True):
            assert (a.text, a.finish_reason, a.completion_tokens) == (b.text, b.finish_reason, b.completion_tokens)
            assert [t.token for t in a.tokens] == [t.token for t in b.tokens]
            torch.testing.assert_close([t.logprob for t in a.tokens], [t.logprob for t in b.tokens], rtol=0, atol=1e-5)
            assert [sorted(t.top_logprobs or {}) for t in a.tokens] == [sorted(t.top_logprobs or {}) for t in b.tokens]


def test_bfloat16_steps_batched_equal_unbatched(models: LoadedModels) -> None:
    half_batched = Engine(models, EngineOptions(batching=True, dtype=torch.bfloat16))
    half_alone = Engine(models, EngineOptions(batching=False, dtype=torch.bfloat16))
    together = run_concurrently(half_batched, REQUESTS)
    for req, shared in zip(REQUESTS, together, strict=True):
        assert [c.text for c in shared.choices] == [c.text for c in half_alone.generate(req).choices]


def test_next_token_batched_equals_unbatched(batched: Engine, alone: Engine) -> None:
    prompts = ["", "To be, or not to b", "Hark", "x" * 150]
    answers: dict[str, list[str]] = {}

    def one(prompt: str) -> None:
        answers[prompt] = [c.token for c in batched.next_token(prompt, 5).candidates]

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for prompt in prompts:
        single = alone.next_token(prompt, 5)
        assert answers[prompt] == [c.token for c in single.candidates]


def steps_settle(engine: Engine, limit: float = 10.0) -> int:
    """The scheduler's step count once it stops changing (the batch is empty)."""
    assert engine.scheduler is not None
    deadline = time.monotonic() + limit
    last = -1
    while engine.scheduler.steps != last:
        assert time.monotonic() < deadline, "the scheduler kept stepping"
        last = engine.scheduler.steps
        time.sleep(0.05)
    return last


def test_a_cancelled_sequence_leaves_the_batch(batched: Engine) -> None:
    endless = GenerationRequest(prompt="a", max_tokens=1_000_000, params=SamplingParams(), seed=1)
    stream = batched.stream(endless)
    next(stream)
    stream.close()
    assert batched.scheduler is not None
    at_close = batched.scheduler.steps
    settled = steps_settle(batched)
    assert settled - at_close <= 3  # the scheduler drops the row at its next step or so, not a million later
    time.sleep(0.2)
    assert batched.scheduler is not None and batched.scheduler.steps == settled
    # The batch serves later requests as before.
    assert batched.generate(GenerationRequest(prompt="b", max_tokens=5, seed=2)).choices[0].completion_tokens == 5


def test_jobs_beyond_the_row_cap_wait_their_turn(models: LoadedModels, alone: Engine) -> None:
    small = Engine(models, EngineOptions(batching=True, max_batch_rows=3))
    together = run_concurrently(small, REQUESTS)
    assert small.scheduler is not None and small.scheduler.max_batch_seen == 4  # one job of n=4 always fits alone
    for req, shared in zip(REQUESTS, together, strict=True):
        assert [c.text for c in shared.choices] == [c.text for c in alone.generate(req).choices]


class FailsOnce:
    """A kernel that raises on its first call, then behaves."""

    def __init__(self, kernel: FusedStep) -> None:
        self.kernel, self.failed = kernel, False

    def __call__(self, ids: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if not self.failed:
            self.failed = True
            raise RuntimeError("injected")
        return self.kernel(ids, h, c)

    def prefill(
        self, sequences: list[list[int]], initial: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        return self.kernel.prefill(sequences, initial)


def test_a_failing_step_fails_its_requests_not_the_scheduler(models: LoadedModels) -> None:
    engine = Engine(models, EngineOptions(batching=True))
    engine.kernel = FailsOnce(engine.kernel)  # type: ignore[assignment]
    with pytest.raises(RuntimeError, match="injected"):
        engine.generate(GenerationRequest(prompt="a", max_tokens=10, seed=1))
    assert engine.generate(GenerationRequest(prompt="a", max_tokens=10, seed=1)).choices[0].completion_tokens == 10


def test_the_stream_interval_waits_after_the_first_piece_and_keeps_the_text(
    models: LoadedModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No real waiting: the reader's sleeps are recorded in order with the pieces it yields."""
    req = GenerationRequest(prompt="To be", max_tokens=60, params=SamplingParams(temperature=1.0), seed=9)
    events: list[Any] = []
    monkeypatch.setattr("service.engine.scheduler.time.sleep", events.append)
    texts: dict[float, list[str]] = {}
    for interval in (0.0, 0.05):
        events.clear()
        engine = Engine(models, EngineOptions(batching=True, stream_interval_seconds=interval))
        texts[interval] = []
        for delta in engine.stream(req):
            texts[interval].append(delta.text)
            events.append("piece")
        sleeps = [e for e in events if e != "piece"]
        if interval:
            assert events[0] == "piece"  # the first piece is not held back
            assert sleeps == [interval] * (len(texts[interval]) - 1)  # one wait before each later piece
        else:
            assert sleeps == []
    assert "".join(texts[0.0]) == "".join(texts[0.05]) and len("".join(texts[0.0])) == 60


def test_waiting_deltas_merge_per_choice_in_order() -> None:
    a, b = TokenScore("a", -1.0), TokenScore("b", -2.0)
    items = [
        Delta(index=0, text="a", tokens=[a]),
        Delta(index=1, text="b", tokens=[b]),
        Delta(index=0, text="b", tokens=[b], finish_reason="length", completion_tokens=2, cumulative_logprob=-3.0),
        Delta(index=1, text="a", tokens=[a]),
    ]
    merged = merge_deltas(items)
    assert [(d.index, d.text, d.finish_reason, d.completion_tokens) for d in merged] == [
        (0, "ab", "length", 2),
        (1, "ba", None, 0),
    ]
    assert [t.token for t in merged[0].tokens] == ["a", "b"] and merged[0].cumulative_logprob == -3.0
    assert items[0].text == "a"  # the originals are left as they were


def test_generation_requests_need_at_least_one_choice_and_token() -> None:
    for bad in ({"n": 0}, {"max_tokens": 0}):
        with pytest.raises(ValueError, match="n >= 1 and max_tokens >= 1"):
            GenerationRequest(**{"prompt": "a", "max_tokens": 5, **bad})  # type: ignore[arg-type]


def test_a_job_that_waited_past_its_deadline_ends_with_deadline(models: LoadedModels) -> None:
    engine = Engine(models, EngineOptions(batching=True, max_batch_rows=1))
    hog = engine.stream(GenerationRequest(prompt="a", max_tokens=1_000_000, seed=1))
    next(hog)  # the only row is taken
    late = GenerationRequest(prompt="b", max_tokens=50, seed=2, n=2, deadline=time.monotonic() + 0.05)
    result = engine.generate(late)  # waits for room, which never comes before its deadline
    hog.close()
    assert [(c.text, c.finish_reason, c.completion_tokens) for c in result.choices] == [("", "deadline", 0)] * 2


def test_a_batch_that_cannot_be_built_fails_its_requests_not_the_scheduler(models: LoadedModels) -> None:
    engine = Engine(models, EngineOptions(batching=True))
    real = engine.new_batch
    calls = {"n": 0}

    def first_fails() -> DecodeBatch:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected")
        return real()

    engine.scheduler.make_batch = first_fails  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="injected"):
        engine.generate(GenerationRequest(prompt="a", max_tokens=5, seed=1))
    assert engine.generate(GenerationRequest(prompt="a", max_tokens=5, seed=1)).choices[0].completion_tokens == 5


def test_a_stream_that_fails_ends_with_an_error_event_and_no_done(app: Flask) -> None:
    def chunks() -> Iterator[dict[str, Any]]:
        yield {"model": "m", "choices": [{"index": 0, "text": "a", "finish_reason": None}]}
        raise RuntimeError("injected")

    with app.test_request_context():
        body = "".join(sse_response(chunks()).response)  # type: ignore[arg-type]
    events = [e for e in body.split("\n\n") if e]
    assert json.loads(events[0].removeprefix("data: "))["choices"][0]["text"] == "a"
    assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == "internal_error"
    assert "[DONE]" not in body


def test_fused_kernel_reproduces_the_training_evaluation(models: LoadedModels) -> None:
    """The decode kernel, stepped over long segments, gives the held-out figure training reports."""
    text = "".join(doc.text[:9000] for doc in load_plays()[:2])  # two segments of 8,192 and a remainder
    ids = torch.tensor(models.vocab.encode(text))
    expected = evaluate_bpc(models.lm, ids, models.vocab.bos_id, EVAL_SEGMENT)
    assert heldout_bpc(models, FusedStep(models.lm), text)[0] == pytest.approx(expected, abs=1e-4)


def test_concurrent_prompts_are_encoded_together(models: LoadedModels) -> None:
    engine = Engine(models, EngineOptions(batching=True))
    start = threading.Barrier(8)

    def client(i: int) -> None:
        start.wait()
        for j in range(5):
            engine.next_token(f"{i} and {j}: to be, or not to be", 3)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert engine.scheduler is not None
    assert engine.scheduler.prefilled_prompts == 40
    assert engine.scheduler.prefills < 40  # some encodes served several requests at once


def test_only_recent_prompt_batches_make_an_idle_scheduler_wait() -> None:
    """Concurrent clients keep being encoded together; a lone request after a burst has ended is not held
    back waiting for company that will not come."""
    scheduler = Scheduler(lambda: None, gather_seconds=0.015)  # type: ignore[arg-type,return-value]
    now = time.monotonic()
    scheduler._recent_prefill_sizes.extend([(now - 2.0, 8), (now - 0.1, 3)])
    assert scheduler.expected_prompts(now) == 3  # the burst of 8, two seconds ago, no longer counts
    assert scheduler.expected_prompts(now + Scheduler.RECENT_SECONDS) == 0


class SchedulerDies(BaseException):
    """Not an Exception: what the scheduler's own handler does not catch, so its thread ends."""


class DiesOnce(FailsOnce):
    def __call__(self, ids: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if not self.failed:
            self.failed = True
            raise SchedulerDies("injected")
        return self.kernel(ids, h, c)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_scheduler_thread_that_dies_fails_its_readers_even_once_another_thread_runs(
    models: LoadedModels,
) -> None:
    """A reader whose job died with its thread must not wait for ever because a later request started a new
    scheduler thread."""
    engine = Engine(models, EngineOptions(batching=True))
    engine.kernel = DiesOnce(engine.kernel)  # type: ignore[assignment]
    scheduler = engine.scheduler
    assert scheduler is not None
    outcomes: list[str] = []

    def read() -> None:
        try:
            engine.generate(GenerationRequest(prompt="a", max_tokens=50, seed=1))
            outcomes.append("answered")
        except RuntimeError:
            outcomes.append("failed")

    orphan = threading.Thread(target=read)
    orphan.start()
    deadline = time.monotonic() + 10
    while not engine.kernel.failed or scheduler.alive():  # type: ignore[attr-defined]
        assert time.monotonic() < deadline
        time.sleep(0.001)
    later = engine.stream(
        GenerationRequest(prompt="b", max_tokens=1_000_000, seed=2)
    )  # a new scheduler thread, kept busy
    next(later)
    orphan.join(timeout=5)
    alive = orphan.is_alive()
    later.close()
    assert not alive and outcomes == ["failed"]
    assert engine.generate(GenerationRequest(prompt="a", max_tokens=10, seed=1)).choices[0].completion_tokens == 10


def test_past_the_drain_deadline_generations_end_with_shutdown(models: LoadedModels) -> None:
    engine = Engine(models, EngineOptions(batching=True, max_batch_rows=1))
    try:
        running = engine.stream(GenerationRequest(prompt="a", max_tokens=1_000_000, seed=1))
        next(running)  # the only row is taken
        lifecycle.begin_shutdown(0.0)  # SIGTERM with no grace left: the drain deadline is now
        pieces = list(running)
        assert pieces[-1].finish_reason == "shutdown"
        waited = engine.generate(GenerationRequest(prompt="b", max_tokens=50, seed=2))  # admitted after the deadline
        assert [(c.text, c.finish_reason) for c in waited.choices] == [("", "shutdown")]
    finally:
        lifecycle.reset()
