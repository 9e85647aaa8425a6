"""The committed LM served by LitServe the way its documentation suggests, as a peer for the benchmarks.

    ARTIFACTS_DIR=artifacts LITSERVE_PORT=8002 python -m benchmarks.litserve_server

A `LitAPI` around a plain `torch.nn.LSTM` with the weights in bfloat16 (the one-line change a user makes
for speed), dynamic batching (`max_batch_size` 64, `batch_timeout` 5 ms), 2 workers of one torch thread
each. It imports nothing from this project and answers POST /v1/next-token with the service's fields.
"""

import json
import math
import os
from pathlib import Path
from typing import Any

import litserve as ls
import torch
from safetensors.torch import load_file
from torch import nn

ARTIFACTS = Path(os.environ.get("ARTIFACTS_DIR", "artifacts"))


class CharLM(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size + 1, embed_dim)  # the last id is the start symbol
        self.lstm = nn.LSTM(embed_dim, hidden_size, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)


class NextTokenAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        torch.set_num_threads(1)
        config = json.loads((ARTIFACTS / "lm" / "config.json").read_text(encoding="utf-8"))
        arch = config["architecture"]
        self.model = CharLM(arch["vocab_size"], arch["embed_dim"], arch["hidden_size"], arch["num_layers"])
        self.model.load_state_dict(load_file(str(ARTIFACTS / "lm" / "model.safetensors")))
        self.model = self.model.to(torch.bfloat16).eval()
        self.chars: list[str] = config["vocabulary"]
        self.index = {ch: i for i, ch in enumerate(self.chars)}
        self.unknown = self.index[config["normalization"]["unknown_char"]]
        self.start = int(config["normalization"]["start_symbol_id"])

    def decode_request(self, request: dict[str, Any]) -> tuple[list[int], int]:
        ids = [self.start, *(self.index.get(ch, self.unknown) for ch in str(request["text"]))]
        return ids, int(request.get("top_k", 5))

    def batch(self, inputs: list[tuple[list[int], int]]) -> list[tuple[list[int], int]]:
        return inputs

    def predict(self, inputs: list[tuple[list[int], int]]) -> list[tuple[torch.Tensor, int]]:
        longest = max(len(ids) for ids, _ in inputs)
        ids = torch.tensor([[self.start] * (longest - len(ids)) + ids for ids, _ in inputs])  # left-padded
        with torch.inference_mode():
            out, _ = self.model.lstm(self.model.embed(ids))
            logits = self.model.head(out[:, -1]).float()
        return [(row, top_k) for row, (_, top_k) in zip(logits, inputs, strict=True)]

    def unbatch(self, output: list[tuple[torch.Tensor, int]]) -> list[tuple[torch.Tensor, int]]:
        return output

    def encode_response(self, output: tuple[torch.Tensor, int]) -> dict[str, Any]:
        logits, top_k = output
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        top = torch.topk(logprobs, min(top_k, len(self.chars)))
        candidates = [
            {"token": self.chars[i], "prob": math.exp(lp), "logprob": lp}
            for lp, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]
        return {"model": "litserve", "candidates": candidates}


if __name__ == "__main__":
    server = ls.LitServer(
        NextTokenAPI(),
        accelerator="cpu",
        workers_per_device=2,
        max_batch_size=64,
        batch_timeout=0.005,
        api_path="/v1/next-token",
        healthcheck_path="/healthz",
    )
    server.run(host="127.0.0.1", port=int(os.environ.get("LITSERVE_PORT", "8002")), generate_client_file=False)
