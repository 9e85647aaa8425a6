"""Session handles for the committed model: their size, the time to seal and open one, and what
zlib would save on a real state.

    python -m benchmarks.sessions [--repeats 2000] [--out benchmarks]

The state is a real one: the committed LM's (h, c) after reading a passage of its test split
from the start symbol, as a generation would leave it. Writes sessions.json and .md.
"""

from __future__ import annotations

import argparse
import base64
import zlib
from pathlib import Path

import torch

from benchmarks.common import ARTIFACTS, RESULTS, timed, write_report
from benchmarks.precision import test_text
from seqmodels.artifacts import load_artifacts
from service.engine.types import SessionState
from service.models.sessions import SessionCodec, principal_of


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    models = load_artifacts(ARTIFACTS)
    lm, vocab = models.lm, models.vocab
    *read, last = vocab.encode(test_text(models)[:1000])
    with torch.inference_mode():
        _, (h, c) = lm.hidden(torch.tensor([[vocab.bos_id, *read]]))
    state = SessionState(h[:, 0].clone(), c[:, 0].clone(), last)
    config = lm.config
    codec = SessionCodec(b"benchmark-secret", 3600, models.digest, config.num_layers, config.hidden_size, vocab.size)
    principal = principal_of("benchmark-key")
    handle = codec.seal(state, principal)
    opened = codec.open(handle, principal)
    assert torch.equal(opened.h, state.h) and torch.equal(opened.c, state.c)
    raw = torch.cat([state.h.reshape(-1), state.c.reshape(-1)]).float().numpy().tobytes()
    report = {
        "handle_chars": len(handle),
        "handle_bytes": len(base64.urlsafe_b64decode(handle + "=" * (-len(handle) % 4))),
        "state_bytes": codec.state_bytes,
        "state_bytes_zlib_level_9": len(zlib.compress(raw, 9)),
        "seal_us_median": timed(lambda: codec.seal(state, principal), args.repeats) * 1e6,
        "open_us_median": timed(lambda: codec.open(handle, principal), args.repeats) * 1e6,
        "repeats": args.repeats,
        "torch_threads": 1,
    }
    table = (
        "| handle | before base64url | state | state under zlib -9 | seal (median) | open (median) |\n"
        "|---|---|---|---|---|---|\n"
        f"| {report['handle_chars']:,} characters | {report['handle_bytes']:,} bytes | {report['state_bytes']:,} bytes "
        f"| {report['state_bytes_zlib_level_9']:,} bytes | {report['seal_us_median']:.0f} us "
        f"| {report['open_us_median']:.0f} us |\n"
    )
    write_report(args.out, "sessions", report, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
