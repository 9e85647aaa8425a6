"""The checked-in gRPC code is what `make protos` generates from the checked-in .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PROTOS = REPO / "service/api/inference_protocol/grpc"


def test_generated_code_is_current(tmp_path: Path) -> None:
    sources = sorted(PROTOS.glob("*.proto"))
    relative = [str(p.relative_to(REPO)) for p in sources]
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(REPO), f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *relative],
        check=True, cwd=REPO,
    )  # fmt: skip
    generated = sorted((tmp_path / "service/api/inference_protocol/grpc").iterdir())
    assert [p.name for p in generated] == sorted(p.name for p in PROTOS.iterdir() if "_pb2" in p.name)
    for path in generated:
        assert path.read_bytes() == (PROTOS / path.name).read_bytes(), f"{path.name}: run `make protos`"
