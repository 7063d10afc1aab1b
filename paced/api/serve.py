"""Run the curriculum service: `paced serve [--home DIR] [--host 127.0.0.1] [--port 8000]`.

Settings come from the environment with the `PACED_` prefix (PACED_TOKEN, PACED_LEASE_TTL_SECONDS,
PACED_MAX_SHARD_SIZE, PACED_MAX_REQUEST_BYTES, …). The service refuses a non-loopback host
without PACED_TOKEN. One process: the service is the only writer of its state database.
OpenAPI at /openapi.json, docs at /docs, Prometheus metrics at /metrics.
"""

from __future__ import annotations

import ipaddress

from paced.errors import InputError


def add_arguments(parser) -> None:
    from paced.store.home import add_home_argument

    add_home_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


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
        raise InputError(f"bad service setting PACED_{str(first['loc'][0]).upper()}: {first['msg']}") from err


def run(args) -> int:
    settings = load_settings(args.home)
    if not is_loopback(args.host) and not settings.require_token():
        raise InputError(f"refusing to serve on non-loopback host {args.host} without a token: set PACED_TOKEN")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {args.port}")
    import uvicorn

    from paced.api.app import create_app

    app = create_app(settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, workers=1)
    return 0
