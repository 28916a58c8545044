"""Container entrypoint: write the model repository from environment variables, then start the server.

    HYBRIDIFF_MODELS="sdxl=/models/sdxl,sd3=/models/sd3" python -m deploy.entrypoint [--dry-run]

It calls the same two command lines ``make serve`` runs, ``export.make_repository`` and the launcher
``python -m hybridiff.tritonserver``, through their ``main`` functions, so the container passes the
launcher the flags ``make serve`` passes by construction (``tests/test_deploy.py`` compares the two).
It lives beside ``export/`` rather than in the serving package because it depends on the repository
generator, which the serving package must not.

Environment (every variable but ``HYBRIDIFF_MODELS`` optional):

========================================  ==========================  ====================================
variable                                  default                     meaning
========================================  ==========================  ====================================
``HYBRIDIFF_MODELS``                      (required)                  ``family=checkpoint folder``, comma separated
``HYBRIDIFF_DEVICES``                     ``2``                       denoiser devices (GPUs or CPU cores)
``HYBRIDIFF_KIND``                        ``gpu``                     ``gpu`` or ``cpu``
``HYBRIDIFF_MAX_HEIGHT``/``_WIDTH``       generator default (1024)    largest image side accepted
``HYBRIDIFF_MAX_STEPS``                   generator default (200)     most steps accepted
``HYBRIDIFF_ORCHESTRATOR_INSTANCES``      generator default (4)       requests in flight per family
``HYBRIDIFF_BATCH_DELAY_US``              generator default (0)       denoiser dynamic-batching delay
``HYBRIDIFF_QUEUE_SIZE``                  generator default (4)       requests that may wait per family
``HYBRIDIFF_START_TIMEOUT_US``            generator default (60 s)    a waiting request is refused after this
``HYBRIDIFF_MAX_PER_DEVICE``              generator default (0: off)  orchestrator gate
``HYBRIDIFF_ADMIT_BY_DEADLINE``           generator default (1: on)   refuse what cannot finish in its timeout
``HYBRIDIFF_REPOSITORY``                  ``/tmp/model_repository``   where the repository is written
``HYBRIDIFF_HTTP_PORT``/``GRPC``/``METRICS``  ``8000``/``8001``/``8002``  ports
``HYBRIDIFF_LISTEN_ADDRESS``              ``0.0.0.0``                 address the three endpoints bind
``HYBRIDIFF_ADMIN_KEY``                   generated at start          key of the admin APIs (else generated)
``HYBRIDIFF_ADMIN_KEY_FILE``              ``/tmp/hybridiff/admin-key``  where the key is written (0600)
``HYBRIDIFF_SERVER_ROOT``                 unset (the wheel's server)  e.g. ``/opt/tritonserver`` in the image
``HYBRIDIFF_BACKEND_DIR``                 ``/tmp/triton_backends``    where the Python backend is assembled
========================================  ==========================  ====================================
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

from export import make_repository
from hybridiff import tritonserver

PREFIX = "HYBRIDIFF_"


class ConfigError(ValueError):
    """An environment variable is missing or malformed; the message names it."""


def _get(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    value = env.get(PREFIX + name, "").strip()
    return value or default


def _int(env: Mapping[str, str], name: str, default: int | None, minimum: int = 0) -> int | None:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{PREFIX}{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{PREFIX}{name}={value} must be >= {minimum}")
    return value


def parse_models(raw: str | None) -> list[tuple[str, str]]:
    """``"sdxl=/a,sd3=/b"`` -> ``[("sdxl", "/a"), ("sd3", "/b")]``, refusing anything else by name."""
    if not raw:
        raise ConfigError(f"{PREFIX}MODELS is required: family=checkpoint folder, comma separated, e.g. sdxl=/m/sdxl")
    models = []
    for item in raw.split(","):
        family, sep, folder = item.strip().partition("=")
        if not sep or not family or not folder:
            raise ConfigError(f"{PREFIX}MODELS entry {item.strip()!r} is not family=checkpoint folder")
        models.append((family.strip(), folder.strip()))
    families = [f for f, _ in models]
    if len(set(families)) != len(families):
        raise ConfigError(f"{PREFIX}MODELS names a family twice: {families}")
    return models


def repository_argv(env: Mapping[str, str]) -> list[str]:
    """The ``export.make_repository`` command line the environment asks for."""
    argv = ["--out", _get(env, "REPOSITORY", "/tmp/model_repository")]
    for family, folder in parse_models(_get(env, "MODELS")):
        argv += ["--model", f"{family}={folder}"]
    argv += ["--devices", str(_int(env, "DEVICES", 2, minimum=1))]
    kind = _get(env, "KIND", "gpu")
    if kind not in ("cpu", "gpu"):
        raise ConfigError(f"{PREFIX}KIND={kind!r} must be cpu or gpu")
    argv += ["--kind", kind]
    for name, flag, minimum in (
        ("MAX_HEIGHT", "--max-height", 64),
        ("MAX_WIDTH", "--max-width", 64),
        ("MAX_STEPS", "--max-steps", 1),
        ("ORCHESTRATOR_INSTANCES", "--orchestrator-instances", 1),
        ("BATCH_DELAY_US", "--batch-delay-us", 0),
        ("QUEUE_SIZE", "--queue-size", 0),
        ("START_TIMEOUT_US", "--start-timeout-us", 0),
        ("MAX_PER_DEVICE", "--max-per-device", 0),
    ):
        value = _int(env, name, None, minimum)
        if value is not None:
            argv += [flag, str(value)]
    admit = _int(env, "ADMIT_BY_DEADLINE", None, 0)
    if admit is not None:
        argv.append("--admit-by-deadline" if admit else "--no-admit-by-deadline")
    return argv


def launcher_argv(env: Mapping[str, str]) -> list[str]:
    """The ``hybridiff.tritonserver`` command line: what ``make serve`` passes, with the container's
    paths and ports, plus the server root and listen address when set."""
    argv = ["--model-repository", _get(env, "REPOSITORY", "/tmp/model_repository")]
    for name, flag, default in (("HTTP_PORT", "--http-port", 8000), ("GRPC_PORT", "--grpc-port", 8001),
                                ("METRICS_PORT", "--metrics-port", 8002)):
        argv += [flag, str(_int(env, name, default, minimum=1))]
    argv += ["--backend-dir", _get(env, "BACKEND_DIR", "/tmp/triton_backends")]
    server_root = _get(env, "SERVER_ROOT")
    if server_root is not None:
        argv += ["--server-root", server_root]
    # A pod is reached through its IP, so the container listens on every interface unless told otherwise;
    # the admin APIs stay behind the key either way.
    argv += ["--listen", _get(env, "LISTEN_ADDRESS", "0.0.0.0")]
    argv += ["--admin-key-file", _get(env, "ADMIN_KEY_FILE", "/tmp/hybridiff/admin-key")]
    return argv


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Write the repository, then hand over to the launcher (which replaces this process)."""
    parser = argparse.ArgumentParser(prog="python -m deploy.entrypoint", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="write the repository, print the server command")
    args = parser.parse_args(argv)
    env = os.environ if env is None else env
    try:
        repo_args, server_args = repository_argv(env), launcher_argv(env)
    except ConfigError as err:
        parser.error(str(err))
    make_repository.main(repo_args)
    if args.dry_run:
        # Launcher flags go before its "--" (everything after it is passed to tritonserver).
        split = server_args.index("--") if "--" in server_args else len(server_args)
        server_args = [*server_args[:split], "--dry-run", *server_args[split:]]
    sys.stdout.flush()
    return tritonserver.main(server_args)


if __name__ == "__main__":
    sys.exit(main())
