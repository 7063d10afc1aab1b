"""Run the curriculum service: `paced serve [--home DIR] [--host 127.0.0.1] [--port 8000]`.

Settings come from the environment with the `PACED_` prefix (PACED_TOKEN, PACED_TOKEN_READS,
PACED_LEASE_TTL_SECONDS, PACED_MAX_SHARD_SIZE, PACED_MAX_REQUEST_BYTES, …). The service refuses a
non-loopback host without PACED_TOKEN. One process: the service is the only writer of its state
database. A port already in use is one line and exit 1. A request uvicorn cannot parse (e.g. a
malformed Content-Length) is answered 400 in the service's JSON error shape; the access log
never shows a `token=` query value. OpenAPI at /openapi.json, docs at /docs, Prometheus metrics
at /metrics. docs/security.md says who can read and write what.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket

from paced.errors import InputError

SECRET_QUERY_RE = re.compile(r"((?:^|[?&;])(?:token|access_token|api_key)=)[^&;#\s]*", re.IGNORECASE)


def add_arguments(parser) -> None:
    from paced.store.home import add_home_argument

    add_home_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_settings(home: str | None):
    from pydantic import ValidationError

    from paced.api.settings import Settings

    try:
        return Settings(**({"home": home} if home else {}))
    except ValidationError as err:
        first = err.errors()[0]
        where = f"PACED_{str(first['loc'][0]).upper()}" if first["loc"] else "settings"
        raise InputError(f"bad service setting {where}: {first['msg']}") from err


def redact_secrets(path: str) -> str:
    """`/x?token=abc&a=1` -> `/x?token=[redacted]&a=1`."""
    return SECRET_QUERY_RE.sub(r"\1[redacted]", path)


class RedactSecrets(logging.Filter):
    """On uvicorn's access logger: the request path's secret query values are never written."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) >= 3 and isinstance(record.args[2], str):
            record.args = (*record.args[:2], redact_secrets(record.args[2]), *record.args[3:])
        return True


def bad_request_bytes(message: str) -> bytes:
    """A complete HTTP/1.1 400 response in the service's error shape; the connection closes."""
    body = json.dumps({"error": f"malformed HTTP request: {message}", "code": "bad_request",
                       "detail": None}).encode()
    head = (f"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode()
    return head + body


def json_400_protocol():
    """uvicorn's HTTP protocol (httptools when installed, else h11) answering unparsable requests
    with a JSON 400 instead of plain text."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class JSON400Protocol(Base):
        def send_400_response(self, msg: str) -> None:
            self.transport.write(bad_request_bytes(msg))
            self.transport.close()

    return JSON400Protocol


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port; one clear line when the port is taken or the host is wrong."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port,
                                                             type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as err:
        raise InputError(f"cannot listen on {host}:{port}: {err}") from err
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        hint = "; is another service on it? choose another --port" if "in use" in str(err.strerror) else ""
        raise InputError(f"cannot listen on {host}:{port}: {err.strerror or err}{hint}",
                         code="port_unavailable") from err
    return sock


def run(args) -> int:
    settings = load_settings(args.home)
    if not is_loopback(args.host) and not settings.require_token():
        raise InputError(f"refusing to serve on non-loopback host {args.host} without a token: set "
                         "PACED_TOKEN")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {args.port}")
    import uvicorn

    from paced.api.app import create_app

    sock = bind(args.host, args.port)
    app = create_app(settings)
    config = uvicorn.Config(app, log_level=args.log_level, workers=1, http=json_400_protocol())
    logging.getLogger("uvicorn.access").addFilter(RedactSecrets())
    host, port = sock.getsockname()[:2]
    logging.getLogger("paced.api").info("paced serve on http://%s:%d (data home %s)", host, port,
                                        app.state.service.home.root)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
