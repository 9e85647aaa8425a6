"""A plain reference server: what a user would write to serve the committed LM without this project.

Flask and `torch.nn.LSTM` in float32, loading the same artifact (safetensors weights and the JSON
config), served by gunicorn's default sync workers:

    ARTIFACTS_DIR=artifacts gunicorn -w 2 -b 127.0.0.1:8001 benchmarks.reference_server:app

It imports nothing from this project, so the benchmark's ratios compare the project with the obvious
alternative, not with itself. Each worker uses one torch thread (REFERENCE_TORCH_THREADS), as the
project's workers do, so that two workers share two cores without oversubscribing them. It answers
POST /v1/next-token with the same request and response fields as the service.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from flask import Flask, jsonify, request
from safetensors.torch import load_file
from torch import nn

ARTIFACTS = Path(os.environ.get("ARTIFACTS_DIR", "artifacts"))
torch.set_num_threads(int(os.environ.get("REFERENCE_TORCH_THREADS", "1")))


class CharLM(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size + 1, embed_dim)  # the last id is the start symbol
        self.lstm = nn.LSTM(embed_dim, hidden_size, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(ids))
        return self.head(out[:, -1])


config = json.loads((ARTIFACTS / "lm" / "config.json").read_text(encoding="utf-8"))
arch = config["architecture"]
model = CharLM(arch["vocab_size"], arch["embed_dim"], arch["hidden_size"], arch["num_layers"])
model.load_state_dict(load_file(str(ARTIFACTS / "lm" / "model.safetensors")))
model.eval()
chars: list[str] = config["vocabulary"]
index = {ch: i for i, ch in enumerate(chars)}
unknown = index[config["normalization"]["unknown_char"]]
start = int(config["normalization"]["start_symbol_id"])

app = Flask(__name__)


@app.post("/v1/next-token")
def next_token() -> Any:
    body = request.get_json()
    text, top_k = str(body["text"]), int(body.get("top_k", 5))
    ids = torch.tensor([[start, *(index.get(ch, unknown) for ch in text)]])
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(ids)[0].double(), dim=-1)
    top = torch.topk(logprobs, min(top_k, len(chars)))
    candidates = [
        {"token": chars[i], "prob": math.exp(lp), "logprob": lp}
        for lp, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
    ]
    return jsonify(model="reference", candidates=candidates)


@app.get("/healthz")
def healthz() -> Any:
    return jsonify(status="ok")
