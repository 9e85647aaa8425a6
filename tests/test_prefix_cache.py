"""The prefix-state cache and chunked prefill: output with them equals output without them."""

from __future__ import annotations

import array
import threading
import uuid
from pathlib import Path

import pytest
import torch
from flask.testing import FlaskClient

from seqmodels.artifacts import LoadedModels, load_artifacts
from service.engine.engine import Engine, EngineOptions, Generation
from service.engine.jobs import Job, Logits
from service.engine.observer import EngineObserver
from service.engine.prefix_cache import CHECKPOINT, CachedState, PrefixCache, PrefixKeys
from service.engine.sampling import SamplingParams
from service.engine.scoring import TextScore
from service.engine.types import GenerationRequest
from tests.test_batching import run_concurrently
from tests.test_observability import metric_value as value

pytestmark = pytest.mark.unit  # no server: `pytest -m unit` runs these in about a minute

# Three prompts share a prefix longer than two checkpoints; one extends another.
SHARED = ("KING. " + "Now is the winter of our discontent made glorious summer by this sun of York. " * 8)[:600]
PROMPTS = [SHARED + "ROMEO. Hark", SHARED + "JULIET. Ay me", SHARED + "ROMEO. Hark, what light", "short one"]


@pytest.fixture(scope="module")
def models(tiny_artifacts: Path) -> LoadedModels:
    return load_artifacts(tiny_artifacts)


@pytest.fixture(scope="module")
def plain(models: LoadedModels) -> Engine:
    """No cache, no chunks, no batching: today's arithmetic."""
    return Engine(models, EngineOptions(batching=False))


def cached_engine(models: LoadedModels, max_bytes: int = 1 << 20, chunk: int = 0, batching: bool = True) -> Engine:
    return Engine(
        models, EngineOptions(batching=batching, prefill_chunk_chars=chunk), prefix_cache=PrefixCache(max_bytes)
    )


def requests_for(prompts: list[str]) -> list[GenerationRequest]:
    params = [SamplingParams(temperature=0.9), SamplingParams(temperature=0.0), SamplingParams(top_k=4)]
    return [
        GenerationRequest(prompt=p, max_tokens=40, params=params[i % 3], seed=i, n=1 + i % 2, top_logprobs=i % 2 * 2)
        for i, p in enumerate(prompts)
    ]


def assert_same_generations(got: list[Generation], expected: list[Generation]) -> None:
    for a_gen, b_gen in zip(got, expected, strict=True):
        for a, b in zip(a_gen.choices, b_gen.choices, strict=True):
            assert (a.text, a.finish_reason, a.completion_tokens) == (b.text, b.finish_reason, b.completion_tokens)
            torch.testing.assert_close([t.logprob for t in a.tokens], [t.logprob for t in b.tokens], rtol=0, atol=1e-5)
            assert [sorted(t.top_logprobs or {}) for t in a.tokens] == [sorted(t.top_logprobs or {}) for t in b.tokens]


def assert_same_scores(got: list[TextScore], expected: list[TextScore]) -> None:
    for a, b in zip(got, expected, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t.token for t in a.tokens] == [t.token for t in b.tokens]
        torch.testing.assert_close([t.logprob for t in a.tokens], [t.logprob for t in b.tokens], rtol=0, atol=1e-5)


def test_keys_depend_only_on_the_prefix_and_ends_are_indexed_by_the_checkpoint_before_them() -> None:
    ids = list(range(2 * CHECKPOINT + 10))
    keys = PrefixKeys(ids)
    assert keys.checkpoints == [CHECKPOINT, 2 * CHECKPOINT] and keys.length == len(ids)
    assert PrefixKeys(ids[:CHECKPOINT] + [7] * 300).key(CHECKPOINT) == keys.key(CHECKPOINT)
    assert PrefixKeys([1, *ids[1:]]).key(CHECKPOINT) != keys.key(CHECKPOINT)
    assert PrefixKeys(ids[:300]).key(300) == keys.key(300) != keys.key(301)
    assert keys.region(300) == keys.key(CHECKPOINT) and keys.region(10) == keys.key(0)
    assert keys.region(CHECKPOINT) is None


def entry(length: int, logprobs: bool = False) -> CachedState:
    values = array.array("d", [0.0] * (length - 1)) if logprobs else None
    return CachedState(length=length, h=torch.zeros(1, 8), c=torch.zeros(1, 8), logits=torch.zeros(4), logprobs=values)


def test_lookups_find_the_longest_prefix_and_eviction_keeps_the_bytes_bounded() -> None:
    ids = list(range(2 * CHECKPOINT + 20))
    size = entry(5).nbytes
    cache = PrefixCache(3 * size)
    for length in (5, 6, 7):
        cache.put(PrefixKeys(ids[:length]), entry(length))
    found = cache.lookup(PrefixKeys(ids[:9]))  # 7 is found among the lengths that end after the start
    assert found is not None and found.length == 7
    assert cache.lookup(PrefixKeys([99, *ids[1:9]])) is None  # another sequence
    found = cache.lookup(PrefixKeys(ids[:5]))  # 5 is now the most recently used; 6 the least
    assert found is not None and found.length == 5
    cache.put(PrefixKeys(ids[:8]), entry(8))
    assert cache.bytes <= 3 * size and len(cache) == 3
    found = cache.lookup(PrefixKeys(ids[:6]))
    assert found is not None and found.length == 5  # 6 was evicted
    assert (cache.hits, cache.misses, cache.saved) == (3, 1, 17)
    cache.put(PrefixKeys(ids), entry(200, logprobs=True))  # larger than the whole cache: not kept
    assert cache.bytes <= 3 * size and len(cache) == 3 and cache.lookup(PrefixKeys(ids[:200])) is not None
    with pytest.raises(ValueError, match="same shapes"):
        cache.put(
            PrefixKeys(ids), CachedState(length=9, h=torch.zeros(2, 8), c=torch.zeros(1, 8), logits=torch.zeros(4))
        )

    cache = PrefixCache(1 << 20)
    cache.put(PrefixKeys(ids), entry(CHECKPOINT))  # a checkpoint, and past it an end
    cache.put(PrefixKeys(ids), entry(CHECKPOINT + 3))
    found = cache.lookup(PrefixKeys(ids[: CHECKPOINT + 10]))
    assert found is not None and found.length == CHECKPOINT + 3
    assert cache.lookup(PrefixKeys(ids), scored=True) is None  # no entry has log-probabilities yet
    cache.put(PrefixKeys(ids), entry(CHECKPOINT, logprobs=True))  # one with log-probabilities replaces one without
    found = cache.lookup(PrefixKeys(ids), scored=True)
    assert found is not None and found.length == CHECKPOINT and found.logprobs is not None
    cache.put(PrefixKeys(ids), entry(CHECKPOINT))  # ... and is not replaced by one without
    assert cache.lookup(PrefixKeys(ids), scored=True) is not None


def test_generation_with_the_cache_equals_generation_without_it(models: LoadedModels, plain: Engine) -> None:
    engine = cached_engine(models)
    reqs = requests_for(PROMPTS)
    first = [engine.generate(r) for r in reqs]  # misses, then partial hits on the shared checkpoints
    cache = engine.prefix_cache
    assert cache is not None and cache.hits >= 2 and cache.saved >= 2 * 2 * CHECKPOINT
    hits = cache.hits
    again = run_concurrently(engine, reqs)  # whole-prompt hits, concurrently
    assert cache.hits == hits + len(reqs)
    expected = [plain.generate(r) for r in reqs]
    assert_same_generations(first, expected)
    assert_same_generations(again, expected)


def test_next_token_with_the_cache_equals_next_token_without_it(models: LoadedModels, plain: Engine) -> None:
    engine = cached_engine(models, chunk=32)
    for prompt in [*PROMPTS, *PROMPTS]:
        got, expected = engine.next_token(prompt, 5), plain.next_token(prompt, 5)
        assert [c.token for c in got.candidates] == [c.token for c in expected.candidates]
        torch.testing.assert_close(
            [c.logprob for c in got.candidates], [c.logprob for c in expected.candidates], rtol=0, atol=1e-5
        )
    assert engine.prefix_cache is not None and engine.prefix_cache.hits >= len(PROMPTS)


def test_a_growing_conversation_starts_where_the_previous_request_stopped(models: LoadedModels, plain: Engine) -> None:
    """The next turn holds the previous prompt and its reply: it is encoded from the reply's end on."""
    engine = cached_engine(models)
    cache = engine.prefix_cache
    assert cache is not None
    history = "ALICE. Good morrow, sir.\nBOB."
    for turn in range(4):
        req = GenerationRequest(prompt=history, max_tokens=25, params=SamplingParams(temperature=0.8), seed=turn)
        saved = cache.saved
        got = engine.generate(req)
        assert_same_generations([got], [plain.generate(req)])
        if turn:  # everything before this turn's new line was cached: the last prompt and its reply but one character
            assert cache.saved - saved == len(history) - len(f"\nALICE. Line {turn}.\nBOB.")
        history += got.choices[0].text + f"\nALICE. Line {turn + 1}.\nBOB."


def test_a_cache_too_small_for_everything_evicts_and_stays_correct(models: LoadedModels, plain: Engine) -> None:
    state_bytes = 2 * models.lm.config.num_layers * models.lm.config.hidden_size * 4
    engine = cached_engine(models, max_bytes=3 * (state_bytes + 4 * models.vocab.size + 256))
    prompts = [SHARED[:300] + str(i) for i in range(6)]
    reqs = requests_for(prompts * 2)
    got = run_concurrently(engine, reqs)
    cache = engine.prefix_cache
    assert cache is not None and len(cache) <= 3 and cache.bytes <= cache.max_bytes
    assert_same_generations(got, [plain.generate(r) for r in reqs])


def test_score_with_the_cache_equals_score_without_it(models: LoadedModels, plain: Engine) -> None:
    engine = cached_engine(models)
    texts = [SHARED + "ROMEO. Hark", SHARED[: CHECKPOINT - 1] + "exactly one checkpoint", "short", SHARED[:-5]]
    expected = plain.score(texts, include_tokens=True)
    first = engine.score(texts, include_tokens=True)  # caches the checkpoints, with their characters' values
    cache = engine.prefix_cache
    assert cache is not None and cache.hits == 0 and len(cache) >= 2
    second = engine.score(texts, include_tokens=True)  # starts after the cached prefixes
    assert cache.hits == 3 and cache.saved >= 2 * CHECKPOINT
    third = engine.score([SHARED + "JULIET. Ay me", texts[0]], include_tokens=True)  # a partial hit and a whole one
    assert_same_scores(first, expected)
    assert_same_scores(second, expected)
    assert_same_scores(third, plain.score([SHARED + "JULIET. Ay me", texts[0]], include_tokens=True))
    # Alternatives are not cached: asking for them computes everything and still agrees.
    with_top = engine.score(texts[:1], include_tokens=True, top_logprobs=3)
    assert cache.hits == 5 and with_top[0].tokens[0].top_logprobs
    assert_same_scores(with_top, plain.score(texts[:1], include_tokens=True, top_logprobs=3))
    # A text whose inputs end on a checkpoint is found whole the second time: nothing left to run.
    whole = [SHARED[: 2 * CHECKPOINT]]
    assert_same_scores(engine.score(whole, include_tokens=True), plain.score(whole, include_tokens=True))
    saved = cache.saved
    assert_same_scores(engine.score(whole, include_tokens=True), plain.score(whole, include_tokens=True))
    assert cache.saved - saved == 2 * CHECKPOINT


def test_generation_starts_from_states_that_scoring_cached(models: LoadedModels, plain: Engine) -> None:
    engine = cached_engine(models)
    engine.score([SHARED + "x"], include_tokens=False)
    req = GenerationRequest(
        prompt=SHARED[: 2 * CHECKPOINT + 20], max_tokens=30, params=SamplingParams(temperature=0.8), seed=5
    )
    got = engine.generate(req)
    assert engine.prefix_cache is not None and engine.prefix_cache.saved == 2 * CHECKPOINT
    assert_same_generations([got], [plain.generate(req)])


def test_concurrent_generation_next_token_and_score_share_the_cache(models: LoadedModels, plain: Engine) -> None:
    engine = cached_engine(models, chunk=48)
    reqs = requests_for(PROMPTS * 2)
    scores: list[list[TextScore]] = []
    tops: list[str] = []

    def scorer() -> None:
        for _ in range(3):
            scores.append(engine.score(PROMPTS, include_tokens=True))

    def predictor() -> None:
        for prompt in PROMPTS * 2:
            tops.append(engine.next_token(prompt, 1).candidates[0].token)

    threads = [threading.Thread(target=scorer), threading.Thread(target=predictor)]
    for thread in threads:
        thread.start()
    got = run_concurrently(engine, reqs)
    for thread in threads:
        thread.join(timeout=60)
    assert_same_generations(got, [plain.generate(r) for r in reqs])
    expected = plain.score(PROMPTS, include_tokens=True)
    for result in scores:
        assert_same_scores(result, expected)
    assert tops == [plain.next_token(p, 1).candidates[0].token for p in PROMPTS * 2]


def test_chunked_prefill_equals_whole_prefill(models: LoadedModels, plain: Engine) -> None:
    for chunk in (1, 7, 64):
        engine = Engine(models, EngineOptions(batching=True, prefill_chunk_chars=chunk))
        reqs = requests_for(PROMPTS)
        assert_same_generations(run_concurrently(engine, reqs), [plain.generate(r) for r in reqs])


@pytest.mark.parametrize("chunk", [0, 16])
def test_a_long_prompt_is_encoded_between_the_steps_of_running_streams(models: LoadedModels, chunk: int) -> None:
    """With chunks, the running stream keeps stepping while the long prompt is encoded (one step per
    chunk); without, the prompt is encoded at once, between two steps. Each prompt batch notes the
    decode step it was encoded at, so the count does not depend on how fast this thread submits."""
    steps_at_prefill: list[int] = []

    class NotePrefill(EngineObserver):
        def prefilled(self, prompts: int) -> None:
            assert engine.scheduler is not None
            steps_at_prefill.append(engine.scheduler.steps)

    engine = Engine(models, EngineOptions(batching=True, prefill_chunk_chars=chunk), observer=NotePrefill())
    running = engine.stream(GenerationRequest(prompt="a", max_tokens=1_000_000, seed=1))
    next(running)
    assert engine.scheduler is not None
    long_prompt = (SHARED * 2)[:1000]
    job = Job.next_token(engine.prompt_ids(long_prompt))
    before = len(steps_at_prefill)  # the running stream's prompt was encoded before its first character
    results = engine.scheduler.results(job)
    answer = next(results)
    assert isinstance(answer, Logits)
    logits = answer.values
    encoded_at = set(steps_at_prefill[before:])  # prefilled() runs before the prompt's logits are handed out
    results.close()
    running.close()
    torch.testing.assert_close(logits, plain_logits(models, long_prompt), rtol=0, atol=1e-5)
    chunks = -(-(len(long_prompt) + 1) // chunk) if chunk else 1
    if chunk:
        assert len(encoded_at) >= chunks - 1
    else:
        assert len(encoded_at) == 1


def plain_logits(models: LoadedModels, prompt: str) -> torch.Tensor:
    with torch.inference_mode():
        return models.lm.prefill([[models.vocab.bos_id, *models.vocab.encode(prompt)]])[0][0]


def test_metrics_count_hits_misses_characters_saved_and_bytes(client: FlaskClient) -> None:
    prompt = "".join(chr(ord("a") + int(digit, 16)) for digit in uuid.uuid4().hex[:16]) + SHARED[:280]
    before = client.get("/metrics").get_data(as_text=True)
    for _ in range(2):  # the second time it is found whole
        assert client.post("/v1/next-token", json={"text": prompt}).status_code == 200
    after = client.get("/metrics").get_data(as_text=True)
    hits, misses, saved = (f"charlm_prefix_cache_{name}_total" for name in ("hits", "misses", "chars_saved"))
    lookups = value(after, hits) + value(after, misses) - value(before, hits) - value(before, misses)
    assert lookups == 2 and value(after, hits) - value(before, hits) >= 1
    assert value(after, saved) - value(before, saved) >= len(prompt) + 1
    assert value(after, misses) > 0
    assert value(after, "charlm_prefix_cache_bytes") > 0
