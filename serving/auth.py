"""Optional bearer-token authentication for every RPC (`authorization: Bearer <token>` metadata).

Health checks and reflection stay open so that load balancers and probes need no token.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

from core.errors import UserError
from serving.errors import wrap_handler

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def read_tokens(path: str | Path) -> tuple[str, ...]:
    """Tokens from a file, one a line (blank lines and # comments ignored)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise UserError(f"{path}: cannot read the auth token file ({error.strerror})") from error
    tokens = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not tokens:
        raise UserError(f"{path}: the auth token file holds no token")
    return tokens


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without a valid bearer token with UNAUTHENTICATED."""

    def __init__(self, tokens: tuple[str, ...], open_prefixes: tuple[str, ...] = OPEN_PREFIXES):
        self.tokens = tuple(token.encode() for token in tokens)
        self.open_prefixes = open_prefixes

    def _problem(self, details: grpc.HandlerCallDetails) -> str | None:
        if details.method.startswith(self.open_prefixes):
            return None
        values = [value for key, value in (details.invocation_metadata or ()) if key == "authorization"]
        if not values:
            return "missing authorization metadata (expected 'Bearer <token>')"
        scheme, _, token = str(values[0]).partition(" ")
        if scheme.lower() != "bearer" or not token:
            return "authorization metadata must be 'Bearer <token>'"
        if not any(hmac.compare_digest(token.strip().encode(), known) for known in self.tokens):
            return "invalid bearer token"
        return None

    async def intercept_service(self, continuation, handler_call_details):
        problem = self._problem(handler_call_details)
        handler = await continuation(handler_call_details)
        if problem is None:
            return handler
        if handler is None:  # an unknown method: refused as unauthenticated too, so a caller without a token learns nothing

            async def refuse(request_iterator, context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

            return grpc.stream_stream_rpc_method_handler(refuse)

        def unary(_behaviour):
            async def reject(request, context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

            return reject

        def stream(_behaviour):
            async def reject(request, context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
                yield  # pragma: no cover - makes this an async generator

            return reject

        return wrap_handler(handler, unary=unary, stream=stream)
