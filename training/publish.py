"""Copy a trained artifact folder into a model repository as the next version of a model, atomically.

python -m training.publish ARTIFACTS_DIR --repository DIR --name NAME

The folder is verified against its manifest, copied beside the versions under a name that is not a
version, and renamed in when complete: a server polling the repository (REPOSITORY_POLL_SECONDS) never
sees it half-written, and serves it as the model's new version once it has loaded and verified it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from seqmodels.artifacts import MODEL_NAME, MODEL_NAME_RULE, ArtifactError, publish_version


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.publish", description=__doc__.split("\n")[0])
    p.add_argument("artifacts", type=Path, help="an artifact folder written by python -m training.run")
    p.add_argument("--repository", type=Path, required=True, help="the model repository (MODEL_REPOSITORY)")
    p.add_argument("--name", required=True, help="the model's name: its folder in the repository")
    args = p.parse_args(argv)
    if not MODEL_NAME.match(args.name):
        p.error(f"--name {args.name!r}: use {MODEL_NAME_RULE}")
    try:
        target = publish_version(args.artifacts, args.repository, args.name)
    except (ArtifactError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"published {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
