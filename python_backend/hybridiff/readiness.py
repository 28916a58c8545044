"""Readiness probe that tells the truth while a model is down: every model of the repository is ready.

    python -m hybridiff.readiness --model-repository model_repository [--family sdxl] [--url 127.0.0.1:8000]

Exit status 0 when the server and every model of the repository (or of ``--family``) answer ready,
1 otherwise (naming the models that are not). Triton's own ``/v2/health/ready`` is not enough: with
explicit model control it answers 200 again once a model has finished unloading, since an unloaded
model no longer counts (measured on 2.51, docs/operations.md); the public model's ready endpoint does
not look at the models it calls either. The probe needs no admin key.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path


def repository_models(repository: Path, family: str | None = None) -> list[str]:
    """Models of the repository (folders with a config.pbtxt), or those of one family, sorted."""
    models = sorted(p.parent.name for p in Path(repository).glob("*/config.pbtxt"))
    if family is not None:
        models = [m for m in models if m == family or m.startswith(f"{family}_")]
    return models


def http_ready(http_url: str) -> Callable[[str], bool]:
    """``ready(path)``: GET ``http://<http_url><path>`` answers 200."""

    def ready(path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{http_url}{path}", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    return ready


def not_ready(models: Sequence[str], ready: Callable[[str], bool]) -> list[str]:
    """What is not ready: ``server`` and/or the models, in order; empty when all is ready."""
    down = [] if ready("/v2/health/ready") else ["server"]
    return down + [m for m in models if not ready(f"/v2/models/{m}/ready")]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--family", help="only this family's models (default: every model)")
    parser.add_argument("--url", default="127.0.0.1:8000", help="the server's HTTP host:port")
    args = parser.parse_args(argv)
    models = repository_models(args.model_repository, args.family)
    if not models:
        parser.error(f"no models{' of ' + args.family if args.family else ''} in {args.model_repository}")
    down = not_ready(models, http_ready(args.url))
    print(f"not ready: {', '.join(down)}" if down else f"ready: {len(models)} models", flush=True)
    return 1 if down else 0


if __name__ == "__main__":
    sys.exit(main())
