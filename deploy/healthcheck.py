"""Container health probe: a grpc.health.v1 Check against the server; exit 0 only when SERVING.

The Dockerfile's HEALTHCHECK runs it with the image's Python. It needs only grpcio and
grpcio-health-checking (both in the serving install), not the cyborg package.

    python healthcheck.py [--address HOST:PORT] [--service NAME] [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

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
    return parser.parse_args(argv)


def check(address: str, service: str = "", timeout: float = 3.0) -> str:
    """The serving status name the server reports, or a short reason the check failed."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            return f"{error.code().name}: {error.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    status = check(args.address, args.service, args.timeout)
    print(f"{args.address} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
