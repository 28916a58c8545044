"""The server's admin surface: which APIs need the admin key, where the key comes from, where we listen.

Triton 2.51 leaves its logging, trace, shared-memory and model-repository APIs open to anyone who
reaches a port, and listens on every interface. We restrict those groups on HTTP and gRPC to one
key (``--http-restricted-api`` / ``--grpc-restricted-protocol``), keep inference, health, metadata,
model-config, statistics and metrics open, and listen on 127.0.0.1 unless told otherwise. Explicit
model control lets the supervisor reload a model whose stub died (``POST .../load`` with the key).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path

# HTTP header the restricted APIs expect. On gRPC Triton reads the metadata key
# ``triton-grpc-protocol-<name>`` for a restriction declared as ``<name>=<value>``.
ADMIN_HEADER = "admin-key"
GRPC_ADMIN_METADATA = f"triton-grpc-protocol-{ADMIN_HEADER}"
RESTRICTED_GROUPS = ("model-repository", "logging", "shared-memory", "trace")
ADMIN_KEY_ENV = "HYBRIDIFF_ADMIN_KEY"
DEFAULT_LISTEN = "127.0.0.1"


def validate_key(key: str) -> str:
    """Triton splits the restriction at ``:``, ``=`` and ``,``; a key holding one would break start-up."""
    if len(key) < 16:
        raise ValueError(f"{ADMIN_KEY_ENV}: the admin key must have at least 16 characters, got {len(key)}")
    bad = sorted({c for c in key if c in ":=, \t\n\"'" or not c.isprintable()})
    if bad:
        raise ValueError(f"{ADMIN_KEY_ENV}: the admin key may not contain {bad!r} (use letters, digits, - or _)")
    return key


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600), never briefly wider."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask cannot widen it, an old file's mode cannot either
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def resolve_admin_key(key_file: Path, environ: Mapping[str, str] | None = None) -> str:
    """The operator's key from ``HYBRIDIFF_ADMIN_KEY`` if set, else a fresh random one; either way it is
    written to ``key_file`` (0600), where the supervisor and the operator's tools read it."""
    environ = os.environ if environ is None else environ
    key = environ.get(ADMIN_KEY_ENV) or secrets.token_urlsafe(32)
    validate_key(key)
    write_private(Path(key_file), key + "\n")
    return key


def read_admin_key(key_file: Path) -> str:
    """The key a running server was started with (see ``resolve_admin_key``)."""
    return Path(key_file).read_text().strip()


def admin_args(admin_key: str, listen: str = DEFAULT_LISTEN) -> list[str]:
    """tritonserver flags: listen address, explicit model control, the admin APIs behind the key."""
    groups = ",".join(RESTRICTED_GROUPS)
    validate_key(admin_key)
    return [
        f"--http-address={listen}",
        f"--grpc-address={listen}",
        f"--metrics-address={listen}",
        "--model-control-mode=explicit",
        "--load-model=*",
        f"--http-restricted-api={groups}:{ADMIN_HEADER}={admin_key}",
        f"--grpc-restricted-protocol={groups}:{ADMIN_HEADER}={admin_key}",
    ]
