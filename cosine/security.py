"""CurveZMQ keys and socket set-up shared by workers, serve and clients."""

from __future__ import annotations

import logging
from pathlib import Path

import zmq
import zmq.auth

from cosine.config import SecurityConfig, is_loopback

log = logging.getLogger("cosine.security")


def generate_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret (secret, mode 0600) into directory."""
    directory.mkdir(parents=True, exist_ok=True)
    pub, sec = zmq.auth.create_certificates(str(directory), name)
    Path(sec).chmod(0o600)
    return Path(pub), Path(sec)


def warn_if_exposed(host: str, sec: SecurityConfig, what: str) -> None:
    """Binding beyond loopback without CURVE exposes the service to the whole network."""
    if not is_loopback(host) and not sec.curve:
        log.warning("!!! %s binds %s WITHOUT CurveZMQ: anyone on the network can send it requests. "
                    "Set [security] curve = true (keys: `cosine keys generate`). !!!", what, host)
