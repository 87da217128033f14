"""`loraforge serve`: load the base and the adapter store, bind the socket, run uvicorn until SIGTERM/SIGINT.

uvicorn's graceful shutdown gives what the issue asks of a stop: the listening socket closes (no new requests), the
requests in flight finish, then the engine thread stops and the process exits 0.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import signal
import socket

from loraforge.errors import LoraforgeError
from loraforge.serve.app import create_app

log = logging.getLogger("loraforge")
KEY_ENV = "LORAFORGE_API_KEY"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or a LoraforgeError saying why it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LoraforgeError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port or --host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(options) -> int:
    """Run the server for `options` (a `loraforge.options.ServeOptions`) until SIGTERM/SIGINT; the exit code."""
    import uvicorn

    from loraforge.config import DEFAULT_MODEL
    from loraforge.infer.session import InferenceSession
    from loraforge.infer.store import AdapterStore

    o = options
    api_key = o.api_key or os.environ.get(KEY_ENV) or None
    if not is_loopback(o.host) and api_key is None:
        raise LoraforgeError(f"--host {o.host} is reachable from other machines: give --api-key KEY (or set "
                             f"{KEY_ENV}) so that only your clients can use the server, or bind 127.0.0.1")
    sock = bind(o.host, o.port)
    name = o.model or DEFAULT_MODEL
    session = InferenceSession.open(name, dtype=o.dtype, device=o.device, quantize=o.quantize or "none")
    store = AdapterStore(o.adapters, session, max_resident_mb=o.max_resident_mb) if o.adapters else None
    if store is not None and session.device.type == "cpu":
        from loraforge.lora import sgmv

        sgmv.kernel()  # build (once per machine, ~30 s) or load the mixed-batch kernel now, not on a first request
    app = create_app(session, store, dataclasses.replace(o, api_key=api_key))
    bound_host, bound_port = sock.getsockname()[:2]
    log.info("serving %s%s on http://%s:%d/v1 (key %s)", name,
             f" and the adapters in {o.adapters}" if o.adapters else "", bound_host, bound_port,
             "required" if api_key else "not set: loopback only, admin routes off")
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=None, lifespan="on")
    # uvicorn turns SIGTERM into a graceful stop, then re-raises it to the handler it found: make that one a no-op,
    # so a stopped server exits 0 as a finished job does.
    signal.signal(signal.SIGTERM, lambda *_: log.info("stopped: the requests in flight were finished"))
    uvicorn.Server(config).run(sockets=[sock])
    return 0
