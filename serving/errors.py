"""Serving errors, declared once, and their gRPC status codes.

Every layer raises these (or `ImageError` / `ContractError`); `status_of` turns any exception into
a (code, message) pair, and `ErrorInterceptor` applies it to every RPC of every protocol, so no
servicer decides a status code on its own.
"""

from __future__ import annotations

import inspect
import logging

import grpc

from core.errors import ImageError, ImageTooLarge, UserError

log = logging.getLogger(__name__)


class ServingError(Exception):
    """Base class: an error with a gRPC status code and a short reason label for metrics."""

    code = grpc.StatusCode.INTERNAL
    reason = "internal"


class InvalidArgument(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "invalid_argument"


class ModelNotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "not_found"


class ModelNotReady(ServingError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "unavailable"


class QueueFull(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "queue_full"


class RequestTooLarge(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "too_large"


class ServerBusy(ServingError):
    """A server-wide budget (pixels being decoded at once) is spent: try again shortly."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "busy"


class DeadlineExceeded(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "deadline"


class Unauthenticated(ServingError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "unauthenticated"


class Unimplemented(ServingError):
    """A method this server has but was not started with (a flag turns it on)."""

    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "unimplemented"


class ShuttingDown(ServingError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "shutting_down"


MAX_MESSAGE_CHARS = 1000  # a status message is a header: gRPC refuses the whole reply beyond its 8 KiB limit
MAX_QUOTE_CHARS = 80  # what a message quotes of the client's input (a model name, a version string)


def quote(value: object, limit: int = MAX_QUOTE_CHARS) -> str:
    """repr() of client input for an error message, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "…" + text[-1]


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message for any exception raised while serving a request.

    The server's own faults are INTERNAL with no exception text (it is logged, never sent); every
    message is cut to MAX_MESSAGE_CHARS.
    """
    if isinstance(error, ServingError) and error.code != grpc.StatusCode.INTERNAL:
        code = error.code
    elif isinstance(error, ImageTooLarge):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
    elif isinstance(error, (ImageError, UserError)):
        code = grpc.StatusCode.INVALID_ARGUMENT
    else:
        return grpc.StatusCode.INTERNAL, "internal error (logged by the server)"
    message = str(error)
    return code, message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 1] + "…"


def reason_of(error: BaseException) -> str:
    """A short label for the failure metric."""
    if isinstance(error, ServingError):
        return error.reason
    if isinstance(error, ImageTooLarge):
        return "too_large"
    if isinstance(error, (ImageError, UserError)):
        return "invalid_argument"
    return "internal"


async def _abort(context: grpc.aio.ServicerContext, error: Exception):
    code, message = status_of(error)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("internal error", exc_info=error)
    await context.abort(code, message)


def _wrap_unary(behaviour):
    async def wrapper(request_or_iterator, context):
        try:
            return await behaviour(request_or_iterator, context)
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as error:  # noqa: BLE001 - the one place errors become status codes
            await _abort(context, error)

    return wrapper


def _wrap_stream(behaviour):
    async def wrapper(request_or_iterator, context):
        try:
            async for response in behaviour(request_or_iterator, context):
                yield response
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as error:  # noqa: BLE001
            await _abort(context, error)

    return wrapper


def wrap_handler(handler: grpc.RpcMethodHandler, unary=_wrap_unary, stream=_wrap_stream) -> grpc.RpcMethodHandler:
    """A copy of `handler` whose behaviour goes through `unary` / `stream` wrappers."""
    if handler is None:
        return None
    factories = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    for attribute, factory in factories.items():
        behaviour = getattr(handler, attribute)
        if behaviour is None:
            continue
        # Streaming responses come from an async generator, or from a coroutine using context.write.
        wrap = stream if inspect.isasyncgenfunction(behaviour) else unary
        return factory(
            wrap(behaviour),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions escaping any servicer to status codes with `status_of`."""

    async def intercept_service(self, continuation, handler_call_details):
        return wrap_handler(await continuation(handler_call_details))
