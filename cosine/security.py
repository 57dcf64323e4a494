"""CurveZMQ keys and socket set-up shared by workers, serve and clients.

Every TCP socket owner calls one function before it binds or connects:

    secure_server(sock, sec, endpoint=..., max_message_bytes=..., what=...)   # before bind
    secure_client(sock, keys)                                                 # before connect

``secure_server`` sets ZMQ_MAXMSGSIZE, warns loudly when the endpoint is beyond loopback
without CURVE, and with ``[security] curve = true`` makes the socket a CURVE server: the
ZAP authenticator of the socket's context (one per context, started on first use, stopped
by ``stop_authenticators``) admits only the public keys in ``authorized_keys_dir``, and a
socket monitor logs every refused peer at WARNING. ``secure_client`` gives a connecting
socket its own keypair and the server's public key (``CurveKeys``); with ``None`` it
leaves the socket plain. inproc sockets need neither.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from cosine.config import SecurityConfig, is_loopback

log = logging.getLogger("cosine.security")


# ----- keys --------------------------------------------------------------------------------

def generate_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret (secret, mode 0600) into directory."""
    directory.mkdir(parents=True, exist_ok=True)
    pub, sec = zmq.auth.create_certificates(str(directory), name)
    Path(sec).chmod(0o600)
    return Path(pub), Path(sec)


@dataclass(frozen=True)
class Deployment:
    """What ``generate_deployment`` wrote (paths as given, relative or absolute)."""

    server_public_key: Path
    server_secret_key: Path
    client_secret_keys: dict[str, Path]
    authorized_keys_dir: Path
    created: tuple[Path, ...]  # files written this time (existing keys are kept)

    def toml(self, client: str | None = None) -> str:
        """The [security] block for config.toml, using ``client`` (default: the first)."""
        c = self.client_secret_keys[client or next(iter(self.client_secret_keys))]
        q = lambda p: json.dumps(str(p))  # noqa: E731 - a TOML basic string
        return "\n".join(["[security]", "curve = true",
                          f"server_secret_key = {q(self.server_secret_key)}",
                          f"server_public_key = {q(self.server_public_key)}",
                          f"client_secret_key = {q(c)}",
                          f"authorized_keys_dir = {q(self.authorized_keys_dir)}"])


def generate_deployment(directory: Path, clients: list[str]) -> Deployment:
    """Keys for one deployment, never overwriting existing ones (re-run to add clients):

        DIR/server.key, DIR/server.key_secret    the keypair of every worker and cosine-serve
        DIR/clients/NAME.key[_secret]            one keypair per client
        DIR/authorized/NAME.key                  the client public keys the servers accept
    """
    for n in clients:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", n) or n.startswith("."):
            raise ValueError(f"client name {n!r}: use letters, digits, '.', '_' and '-'")
    created: list[Path] = []
    directory.mkdir(parents=True, exist_ok=True)
    spub, ssec = directory / "server.key", directory / "server.key_secret"
    if not ssec.is_file():
        created += generate_keypair(directory, "server")
    auth = directory / "authorized"
    auth.mkdir(exist_ok=True)
    secrets: dict[str, Path] = {}
    for n in clients:
        cpub, csec = directory / "clients" / f"{n}.key", directory / "clients" / f"{n}.key_secret"
        if not csec.is_file():
            created += generate_keypair(directory / "clients", n)
        if not (auth / f"{n}.key").is_file():
            shutil.copyfile(cpub, auth / f"{n}.key")
            created.append(auth / f"{n}.key")
        secrets[n] = csec
    return Deployment(spub, ssec, secrets, auth, tuple(created))


def load_keypair(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a ``*.key_secret`` file."""
    pub, sec = zmq.auth.load_certificate(str(path))
    if not sec:
        raise ValueError(f"{path} holds no secret key (is it the public .key file? use the .key_secret one)")
    return pub, sec


def load_public_key(path: str | Path) -> bytes:
    return zmq.auth.load_certificate(str(path))[0]


@dataclass(frozen=True)
class CurveKeys:
    """What a connecting socket needs: its own keypair and the server's public key (z85)."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def load(cls, client_secret_key: str | Path, server_public_key: str | Path) -> "CurveKeys":
        """From files written by `cosine keys generate` (the client's .key_secret, server.key)."""
        pub, sec = load_keypair(client_secret_key)
        return cls(pub, sec, load_public_key(server_public_key))

    @classmethod
    def from_config(cls, sec: SecurityConfig) -> "CurveKeys | None":
        """The client keys of [security], or None when curve is off."""
        return cls.load(sec.client_secret_key, sec.server_public_key) if sec.curve else None

    def __repr__(self) -> str:  # never print the secret
        return f"CurveKeys(public={self.public.decode()!r}, server_public={self.server_public.decode()!r})"


def secure_client(sock: zmq.Socket, keys: CurveKeys | None) -> None:
    """Make a socket that connects a CURVE client (before connect); None leaves it plain."""
    if keys is None:
        return
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.server_public


def no_reply_hint(curve: CurveKeys | None) -> str:
    """For a client that never got a reply: a CURVE refusal is silent, it looks like a timeout."""
    if curve is None:
        return " (if the server runs with [security] curve = true, it answers only clients with CURVE keys)"
    return (" (CURVE: check that this client's public key is in the server's authorized_keys_dir and that the "
            "server public key is right; the server logs every refusal)")


@dataclass(frozen=True)
class Refusal:
    """A failed handshake as a connecting socket sees it."""

    message: str
    final: bool  # libzmq gives the connection up (no reconnect): retrying cannot help


def client_refusal(event: int, value: int, curve: bool) -> Refusal | None:
    """What a monitor event of a connecting socket says about a refused handshake, or None."""
    event, value = int(event), int(value)
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return Refusal(f"the server refused this client's CURVE key (ZAP status {value}): its public key is not in "
                       f"the server's authorized_keys_dir (the server logged the refusal)", True)
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:  # the server hung up mid-handshake; libzmq retries
        if curve:
            return Refusal("the server closed the connection during the CurveZMQ handshake: is the server public "
                           "key right? (the server logs refusals)", False)
        return Refusal("the server closed the connection during the handshake: if it runs with [security] "
                       "curve = true it needs a client with CURVE keys: pass curve=CurveKeys.load(client_secret_key, "
                       "server_public_key), or `cosine generate --config config.toml`", False)
    if event != zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return None
    if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        if curve:
            return Refusal("this client uses CurveZMQ but the server does not ([security] curve = false there)", True)
        return Refusal("the server requires CurveZMQ ([security] curve = true) and this client has no keys: pass "
                       "curve=CurveKeys.load(client_secret_key, server_public_key), or `cosine generate --config "
                       "config.toml`", True)
    return Refusal(f"the CurveZMQ handshake failed (ZMTP protocol error 0x{value:x})", True)


CLIENT_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                 | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


# ----- server side ---------------------------------------------------------------------------

def endpoint_host(endpoint: str) -> str | None:
    """HOST of tcp://HOST:PORT (brackets of IPv6 removed); None for inproc/ipc."""
    m = re.fullmatch(r"tcp://(.+):(\d+|\*)", endpoint)
    return m.group(1).strip("[]") if m else None


def warn_if_exposed(host: str, sec: SecurityConfig, what: str) -> None:
    """Binding beyond loopback without CURVE exposes the service to the whole network."""
    if not is_loopback(host) and not sec.curve:
        log.warning("!!! %s binds %s WITHOUT CurveZMQ: anyone on the network can send it requests. "
                    "Set [security] curve = true (keys: `cosine keys generate`). !!!", what, host)


class _Refusals:
    """Logs refused peers at WARNING, once per (server, peer host, reason) and window:
    a refused ZeroMQ client reconnects every 100 ms and must not flood the log."""

    def __init__(self, window_s: float = 30.0):
        self.window_s = window_s
        self._seen: dict[tuple[str, str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def __call__(self, what: str, peer: str, reason: str) -> None:
        host = peer.rsplit(":", 1)[0] if peer.count(":") == 1 or peer.startswith("[") else peer
        key, now = (what, host, reason), time.monotonic()
        with self._lock:
            if len(self._seen) > 4096:  # many peers (a scan): forget the ones outside the window
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window_s}
            last, skipped = self._seen.get(key, (-1e18, 0))
            if now - last < self.window_s:
                self._seen[key] = (last, skipped + 1)
                return
            self._seen[key] = (now, 0)
        more = f" ({skipped} more refusal(s) like it in the last {self.window_s:.0f} s)" if skipped else ""
        log.warning("CURVE: %s refused a connection from %s: %s%s", what, peer, reason, more)


refusals = _Refusals()


class _Authenticator(ThreadAuthenticator):
    """ThreadAuthenticator that logs every denial at WARNING with the peer and the key
    (the stock one logs at debug only)."""

    def __init__(self, context: zmq.Context) -> None:
        super().__init__(context, log=logging.getLogger("cosine.security.zap"))
        self._dirs: dict[str, str] = {}  # ZAP domain (one per secured socket) -> authorized_keys_dir
        self._request: tuple[str, str, bytes] | None = None  # (domain, peer address, key) being decided

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # ZAP request: version, request id, domain, address, identity, mechanism, credentials...
        self._request = (msg[2].decode("utf-8", "replace"), msg[3].decode("utf-8", "replace"),
                         msg[6] if len(msg) > 6 else b"") if len(msg) >= 6 else None
        try:
            await super().handle_zap_message(msg)
        finally:
            self._request = None

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes,
                        user_id: str = "anonymous") -> None:
        if status_code != b"200" and self._request is not None:
            domain, address, key = self._request
            z = z85.encode(key).decode() if len(key) == 32 else "?"
            reason = status_text.decode("utf-8", "replace")
            if reason == "Unknown key":
                reason = (f"client public key {z} is not in authorized_keys_dir "
                          f"{self._dirs.get(domain, '?')} (add its .key file there and restart)")
            refusals(domain or "a server", address or "an unknown peer", reason)
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


_auth_lock = threading.Lock()
_authenticators: dict[zmq.Context, _Authenticator] = {}


def _authenticator(ctx: zmq.Context) -> _Authenticator:
    with _auth_lock:
        a = _authenticators.get(ctx)
        if a is None:
            a = _Authenticator(ctx)
            a.start()
            _authenticators[ctx] = a
        return a


def stop_authenticators() -> None:
    """Stop the ZAP authenticator threads (process shutdown)."""
    with _auth_lock:
        for a in _authenticators.values():
            try:
                a.stop()
            except zmq.ZMQError as e:
                log.debug("stopping a ZAP authenticator: %s", e)
        _authenticators.clear()


_PROTOCOL_REASONS = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "no CURVE: the peer uses another security mechanism "
                                                "(a client without keys?)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "CURVE handshake did not decrypt: the client has a wrong "
                                           "server public key",
    zmq.PROTOCOL_ERROR_ZMTP_KEY_EXCHANGE: "CURVE key exchange failed",
}


def _handshake_reason(event: int, value: int) -> str:
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        return ("the handshake did not complete: the peer hung up (a client without CURVE, or with another "
                "server public key?) or does not speak ZeroMQ")
    return _PROTOCOL_REASONS.get(value, f"ZMTP protocol error 0x{value:x} during the handshake")


def _peer_of(fd: int) -> str | None:
    """Best effort: the remote address of a connection libzmq just accepted. It may have
    closed already (then None; in a burst of refused connections its number may even have
    been reused by the next one); the fd is duplicated, never touched itself."""
    try:
        d = os.dup(fd)
    except OSError:
        return None
    try:
        s = socket.socket(fileno=d)
    except OSError:
        os.close(d)
        return None
    try:
        addr: Any = s.getpeername()
    except OSError:
        return None
    finally:
        s.close()
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"[{addr[0]}]:{addr[1]}" if ":" in str(addr[0]) else f"{addr[0]}:{addr[1]}"
    return str(addr) or None


_WATCHED = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_MONITOR_STOPPED)


def _watch(mon: zmq.Socket, what: str) -> None:
    """Monitor thread: a failed handshake is followed by DISCONNECTED(fd) of its connection
    (one I/O thread per context keeps the events in order); ACCEPTED(fd) named the peer."""
    peers: dict[int, str | None] = {}
    failed: str | None = None
    try:
        while True:
            m = recv_monitor_message(mon)
            ev, value = int(m["event"]), int(m["value"])
            if ev == zmq.EVENT_ACCEPTED:
                peers[value] = _peer_of(value)
            elif ev in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                failed = _handshake_reason(ev, value)
            elif ev == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                failed = None  # the authenticator logged it, with the client's key
                log.debug("%s: ZAP refused a client (status %d)", what, value)
            elif ev == zmq.EVENT_DISCONNECTED:
                peer = peers.pop(value, None)
                if failed is not None:
                    refusals(what, peer or "an unknown peer (it closed before it could be looked up)", failed)
                failed = None
            elif ev == zmq.EVENT_MONITOR_STOPPED:
                return
    except zmq.ZMQError:  # context terminated
        return
    finally:
        mon.close(0)


def secure_server(sock: zmq.Socket, sec: SecurityConfig, *, endpoint: str, max_message_bytes: int,
                  what: str) -> None:
    """Set up a socket that binds ``endpoint`` (call before bind): ZMQ_MAXMSGSIZE, the loud
    warning when it is exposed without CURVE, and with curve on the CURVE server role, ZAP
    authentication against authorized_keys_dir and the refusal log."""
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    host = endpoint_host(endpoint)
    if host is not None:
        warn_if_exposed(host, sec, what)
    if not sec.curve:
        return
    pub, secret = load_keypair(sec.server_secret_key)
    label = f"{what} ({endpoint})"
    auth = _authenticator(sock.context)
    auth._dirs[label] = sec.authorized_keys_dir
    auth.configure_curve(domain=label, location=sec.authorized_keys_dir)
    sock.zap_domain = label.encode()
    sock.curve_secretkey = secret
    sock.curve_publickey = pub
    sock.curve_server = True
    mon = sock.get_monitor_socket(_WATCHED, addr=f"inproc://cosine-curve-monitor-{uuid.uuid4().hex}")
    threading.Thread(target=_watch, args=(mon, label), name="curve-monitor", daemon=True).start()
    log.info("%s: CurveZMQ on, %d authorized client key(s) from %s", label,
             len(auth.certs.get(label, {})), sec.authorized_keys_dir)
