"""Dynamic evaluation (`"adapt": true` on /v1/score): causal, private to each request, bounded."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flask.testing import FlaskClient

from seqmodels.artifacts import load_artifacts
from seqmodels.networks import AdaptConfig, CharLSTM, LMConfig
from service.api.app import create_app
from service.settings import Settings
from tests.test_api import assert_error, post
from training.lm import adapted_bpc

pytestmark = pytest.mark.unit  # no server: `pytest -m unit` runs these in about a minute

TEXT = "What light through yonder window breaks? It is the east, and Juliet is the sun. " * 3


def adapted(lm: CharLSTM, ids: list[int], adapt: AdaptConfig, bos: int) -> torch.Tensor:
    return lm.adapted_logprobs(torch.tensor([[bos, *ids[:-1]]]), torch.tensor([ids]), adapt)


def test_tiny_artifact_carries_settings_chosen_on_validation(tiny_artifacts: Path) -> None:
    models = load_artifacts(tiny_artifacts)
    assert models.adapt.lr == pytest.approx(0.1) and models.adapt.segment_len == 40


def test_every_character_is_scored_before_the_model_trains_on_it(tiny_artifacts: Path) -> None:
    """Changing (here: reversing) the future leaves every earlier character's logprob exactly as it was."""
    models = load_artifacts(tiny_artifacts)
    ids = models.vocab.encode(TEXT)
    cut = 100  # past two segments, so the prefix's own logprobs were computed after two updates
    changed = ids[:cut] + ids[cut:][::-1]
    first = adapted(models.lm, ids, models.adapt, models.vocab.bos_id)
    second = adapted(models.lm, changed, models.adapt, models.vocab.bos_id)
    assert torch.equal(first[:cut], second[:cut])
    assert not torch.equal(first[cut:], second[cut:])


def test_a_rate_of_zero_is_the_static_model(tiny_artifacts: Path) -> None:
    models = load_artifacts(tiny_artifacts)
    ids = models.vocab.encode(TEXT)
    static_adapt = adapted(models.lm, ids, replace(models.adapt, lr=0.0), models.vocab.bos_id)
    with torch.no_grad():
        logits, _, _ = models.lm(torch.tensor([[models.vocab.bos_id, *ids[:-1]]]))
    static = torch.log_softmax(logits.double(), -1)[0].gather(-1, torch.tensor(ids)[:, None])[:, 0]
    assert torch.allclose(static_adapt, static, atol=1e-5)


def test_adaptation_leaves_the_served_weights_untouched(tiny_artifacts: Path) -> None:
    models = load_artifacts(tiny_artifacts)
    before = copy.deepcopy(models.lm.state_dict())
    adapted(models.lm, models.vocab.encode(TEXT), models.adapt, models.vocab.bos_id)
    assert all(torch.equal(before[k], v) for k, v in models.lm.state_dict().items())


def test_documents_adapted_side_by_side_score_as_they_do_one_at_a_time(tiny_artifacts: Path) -> None:
    """The training run's adaptive figure shares documents out over threads, one core each: the same
    bits as reading them one after another on one core, and the thread setting is given back."""
    models = load_artifacts(tiny_artifacts)
    documents = [torch.tensor(models.vocab.encode(TEXT[:n])) for n in (240, 150, 90)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        side_by_side = adapted_bpc(models.lm, documents, models.vocab.bos_id, models.adapt)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        one_at_a_time = adapted_bpc(models.lm, documents, models.vocab.bos_id, models.adapt)
    finally:
        torch.set_num_threads(threads)
    assert side_by_side == one_at_a_time > 0


def test_training_graph_with_dropouts_off_is_the_served_lstm() -> None:
    """The training path (per-layer `_VF.lstm`, for AWD-LSTM's dropouts) computes what eval mode's
    nn.LSTM computes, so the serving kernels' bit-compatibility with nn.LSTM covers trained weights."""
    torch.manual_seed(0)
    config = LMConfig(vocab_size=20, embed_dim=8, hidden_size=16, num_layers=2)
    lm = CharLSTM(config)
    ids = torch.randint(0, 20, (3, 30))
    with torch.no_grad():
        served, _, served_state = lm.eval()(ids)
        lm.config = replace(
            config, dropout=0.0, input_dropout=0.0, hidden_dropout=0.0, weight_dropout=0.0, embed_dropout=0.0
        )
        trained, _, trained_state = lm.train()(ids)
    assert torch.allclose(served, trained, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(served_state, trained_state, strict=True))


def test_score_with_adapt(client: FlaskClient) -> None:
    # Adaptive scoring's first segment runs nn.LSTM (under autocast in bfloat16), static scoring the
    # prompt encoder's oneDNN layers: the same values in float32, within bfloat16's rounding otherwise.
    app_dtype = client.application.extensions["models"].dtype
    tolerance = 1e-5 if app_dtype == torch.float32 else 2e-2
    status, static = post(client, "/v1/score", {"texts": [TEXT, TEXT[:50]], "include_tokens": True})
    assert status == 200
    status, body = post(client, "/v1/score", {"texts": [TEXT, TEXT[:50]], "include_tokens": True, "adapt": True})
    assert status == 200, body
    long, short = body["results"]
    assert long["n_chars"] == len(TEXT) and [t["token"] for t in long["tokens"]] == list(TEXT)
    assert long["logprob"] == pytest.approx(sum(t["logprob"] for t in long["tokens"]), abs=1e-9)
    # The first segment is scored by the unchanged weights; later ones by adapted copies.
    first = [t["logprob"] for t in long["tokens"][:40]]
    assert first == pytest.approx([t["logprob"] for t in static["results"][0]["tokens"][:40]], abs=tolerance)
    assert long["logprob"] != pytest.approx(static["results"][0]["logprob"], abs=1e-6)
    # Each text adapts on its own copy: the short text scores as it would alone.
    status, alone = post(client, "/v1/score", {"texts": [TEXT[:50]], "adapt": True})
    assert short["logprob"] == pytest.approx(alone["results"][0]["logprob"], abs=1e-9)


def test_adapt_is_bounded_in_characters(tiny_artifacts: Path) -> None:
    client = create_app(Settings(artifacts_dir=tiny_artifacts, max_adapt_chars=100)).test_client()
    status, body = post(client, "/v1/score", {"texts": ["a" * 60, "b" * 60], "adapt": True})
    assert_error(status, body, 400)
    assert "at most 100 characters" in body["error"]["message"]
    assert post(client, "/v1/score", {"texts": ["a" * 60, "b" * 60]})[0] == 200  # the cap is for adapt only


def test_adapt_counts_against_the_request_deadline(tiny_artifacts: Path) -> None:
    client = create_app(Settings(artifacts_dir=tiny_artifacts, request_deadline_seconds=1e-9)).test_client()
    status, body = post(client, "/v1/score", {"texts": [TEXT], "adapt": True})
    assert_error(status, body, 503)
    assert body["error"]["code"] == "deadline_exceeded"


def test_adapt_needs_settings_in_the_artifact(tiny_artifacts: Path, tmp_path: Path) -> None:
    app = create_app(Settings(artifacts_dir=tiny_artifacts))
    engine = app.extensions["models"].repository.versions()[0].engine
    engine.models.adapt = AdaptConfig()  # as an artifact whose tuning chose no adaptation
    status, body = post(app.test_client(), "/v1/score", {"texts": ["abc"], "adapt": True})
    assert_error(status, body, 400, param="adapt")
    assert body["error"]["code"] == "adapt_unavailable"
