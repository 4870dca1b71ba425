"""Container health probe: a grpc.health.v1 Check against the server; exit 0 only when SERVING.

The Dockerfile's HEALTHCHECK runs it with the image's Python. It needs only grpcio and
grpcio-health-checking (both in the serving install), not the cyborg package.

    python healthcheck.py [--address HOST:PORT] [--service NAME] [--timeout SECONDS]
                          [--tls-ca FILE [--tls-cert FILE --tls-key FILE] [--tls-server-name NAME]]

Health checks need no bearer token (the server leaves grpc.health.v1 open); a server started with
--tls-cert needs --tls-ca here (and a client certificate under mutual TLS).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_ADDRESS = "127.0.0.1:8001"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--address",
        default=os.environ.get("CYBORG_HEALTH_ADDRESS", DEFAULT_ADDRESS),
        help=f"server address (default: $CYBORG_HEALTH_ADDRESS or {DEFAULT_ADDRESS})",
    )
    parser.add_argument("--service", default="", help='health service name (default: "", the whole server)')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default: 3)")
    parser.add_argument("--tls-ca", default="", help="CA certificate (PEM): connect with TLS and verify the server")
    parser.add_argument("--tls-cert", default="", help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--tls-key", default="", help="client private key (PEM) for mutual TLS")
    parser.add_argument("--tls-server-name", default="", help="name the server certificate must carry (default: the host)")
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_cert and not args.tls_ca:
        parser.error("--tls-cert needs --tls-ca")
    return args


def open_channel(address: str, tls_ca: str = "", tls_cert: str = "", tls_key: str = "", server_name: str = ""):
    """A plaintext channel, or a TLS one when a CA file is given."""
    import grpc

    if not tls_ca:
        return grpc.insecure_channel(address)
    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    credentials = grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, credentials, options=options)


def check(address: str, service: str = "", timeout: float = 3.0, **tls: str) -> str:
    """The serving status name the server reports, or a short reason the check failed."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with open_channel(address, **tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            return f"{error.code().name}: {error.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        status = check(args.address, args.service, args.timeout, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                       tls_key=args.tls_key, server_name=args.tls_server_name)
    except OSError as error:  # an unreadable certificate file
        status = f"cannot read {error.filename}: {error.strerror}"
    print(f"{args.address} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
