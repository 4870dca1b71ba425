"""The web app of `cyborg annotate`: collect human saliency in the browser, and check a photo.

An aiohttp application over a `training.annotations.Session`; the pages are plain HTML, JS and a
canvas (annotate/static/, no build step). The JSON API:

    GET  /api/config                  the session's options (label shown?, repeats, image count, check page on?)
    GET  /api/next?annotator=NAME     the annotator's next image (or finished) and progress
    GET  /api/image/ID                an image of the data set, by its id in the session (nothing else is served)
    POST /api/answer                  multipart: annotator, position, image, decision, time_ms, mask (PNG)
    POST /api/check                   multipart: image -> the gRPC server's verdict, probability and heatmap

Safe by default: the command listens on loopback (and then answers only requests whose Host names
loopback, against DNS rebinding); elsewhere a token is required (bearer header, or `?token=` in the
link, kept in an HttpOnly cookie). POSTs need the `X-Requested-With: cyborg` header (a cross-site
form cannot send it) and a same-origin Origin. Uploads are size-limited and validated.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from core.errors import UserError
from training.annotations import AlreadyAnswered, AnnotationError, Session, check_annotator

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
PAGES = {"/": "annotate.html", "/check": "check.html"}
STATIC_FILES = {"annotate.js": "text/javascript", "check.js": "text/javascript", "style.css": "text/css"}
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".bmp": "image/bmp"}
IMAGE_ID = re.compile(r"^[0-9a-f]{16}$")
MAX_REQUEST_BYTES = 24 * 1024 * 1024  # a mask (at most training.annotations.MAX_MASK_BYTES) or a photo, with form overhead
MAX_PHOTO_BYTES = 20 * 1024 * 1024
TOKEN_COOKIE = "cyborg_annotate_token"
CSRF_HEADER = ("X-Requested-With", "cyborg")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    if host.strip("[]") in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class AppConfig:
    session: Session
    token: str | None = None  # required on every request when set
    loopback_only: bool = True  # answer only requests whose Host header names loopback
    checker: Callable[[bytes], dict[str, Any]] | None = None  # the "check a photo" page; None turns it off


CONFIG = web.AppKey("config", AppConfig)


def create_app(config: AppConfig) -> web.Application:
    app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[guard])
    app[CONFIG] = config
    for path, page in PAGES.items():
        app.router.add_get(path, static_page(page))
    app.router.add_get("/static/{name}", static_file)
    app.router.add_get("/api/config", get_config)
    app.router.add_get("/api/next", get_next)
    app.router.add_get("/api/image/{id}", get_image)
    app.router.add_post("/api/answer", post_answer)
    app.router.add_post("/api/check", post_check)
    return app


async def start(app: web.Application, host: str = "127.0.0.1", port: int = 0, ssl_context=None) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0 picks a free port); returns (runner, port). `await runner.cleanup()` stops it."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, port


# ---- the guard -----------------------------------------------------------------------------------
def problem(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


@web.middleware
async def guard(request: web.Request, handler):
    config: AppConfig = request.app[CONFIG]
    if config.loopback_only and not is_loopback(request.url.host or ""):
        return with_headers(problem(421, "this server answers only requests to localhost (Host header)"))
    set_cookie = None
    if config.token is not None:
        offered = bearer(request) or request.cookies.get(TOKEN_COOKIE) or request.query.get("token", "")
        if not hmac.compare_digest(offered.encode(), config.token.encode()):
            return with_headers(problem(401, "a token is required: open the link printed by `cyborg annotate` (…?token=…)"))
        if "token" in request.query and request.method == "GET" and request.path in PAGES:
            # Keep the token in a cookie and drop it from the address bar (and from the history).
            query = {k: v for k, v in request.query.items() if k != "token"}
            response = web.Response(status=303, headers={"Location": str(request.rel_url.with_query(query))})
            response.set_cookie(TOKEN_COOKIE, config.token, httponly=True, samesite="Strict", secure=request.secure, path="/")
            return with_headers(response)
        if request.cookies.get(TOKEN_COOKIE) != config.token:
            set_cookie = config.token
    if request.method == "POST":
        if request.headers.get(CSRF_HEADER[0]) != CSRF_HEADER[1]:
            return with_headers(problem(403, f"missing header {CSRF_HEADER[0]}: {CSRF_HEADER[1]}"))
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            return with_headers(problem(403, f"cross-origin request from {origin}"))
    try:
        response = await handler(request)
    except web.HTTPException as error:
        raise with_headers(error)
    if set_cookie:
        response.set_cookie(TOKEN_COOKIE, set_cookie, httponly=True, samesite="Strict", secure=request.secure, path="/")
    return with_headers(response)


def with_headers(response: web.StreamResponse) -> web.StreamResponse:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def bearer(request: web.Request) -> str:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


# ---- pages ---------------------------------------------------------------------------------------
def static_page(name: str):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=(STATIC / name).read_bytes(), content_type="text/html", charset="utf-8")

    return handler


async def static_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC_FILES:  # a fixed list: no path from the request reaches the file system
        raise web.HTTPNotFound()
    return web.Response(body=(STATIC / name).read_bytes(), content_type=STATIC_FILES[name], charset="utf-8")


# ---- the annotation API --------------------------------------------------------------------------
async def get_config(request: web.Request) -> web.Response:
    config: AppConfig = request.app[CONFIG]
    session = config.session
    return web.json_response({"show_label": session.show_label, "repeats": session.repeats, "images": len(session.items),
                              "check": config.checker is not None})  # fmt: skip


def progress(session: Session, annotator: str) -> dict[str, Any]:
    pending, done, total = session.log(annotator).progress()
    state: dict[str, Any] = {"annotator": annotator, "done": done, "total": total, "finished": pending is None}
    if pending is not None:
        item = pending.item
        state["item"] = {"position": pending.position, "image": item.id, "url": f"/api/image/{item.id}",
                         "width": item.width, "height": item.height, "repeat": pending.repeat}  # fmt: skip
        if session.show_label:
            state["item"]["label"] = item.label
    return state


def annotator_of(value: str | None) -> str:
    try:
        return check_annotator(value or "")
    except AnnotationError as error:
        raise web.HTTPBadRequest(text=json.dumps({"error": str(error)}), content_type="application/json") from error


async def get_next(request: web.Request) -> web.Response:
    session = request.app[CONFIG].session
    return web.json_response(progress(session, annotator_of(request.query.get("annotator"))))


async def get_image(request: web.Request) -> web.Response:
    session: Session = request.app[CONFIG].session
    identifier = request.match_info["id"]
    item = session.by_id.get(identifier) if IMAGE_ID.match(identifier) else None
    if item is None:
        raise web.HTTPNotFound()
    path = session.image_path(item)
    kind = IMAGE_TYPES.get(path.suffix.lower())
    if kind is None:  # TIFF and other formats a browser cannot show: sent as PNG
        body = await asyncio.to_thread(as_png, path)
        kind = "image/png"
    else:
        body = await asyncio.to_thread(path.read_bytes)
    response = web.Response(body=body, content_type=kind)
    response.headers["Cache-Control"] = "private, max-age=3600"
    return response


def as_png(path: Path) -> bytes:
    import io

    from core.images import read_image, to_rgb

    buffer = io.BytesIO()
    to_rgb(read_image(path)).save(buffer, format="PNG")
    return buffer.getvalue()


async def post_answer(request: web.Request) -> web.Response:
    session: Session = request.app[CONFIG].session
    form = await request.post()
    annotator = annotator_of(str(form.get("annotator", "")))
    mask = form.get("mask")
    if not isinstance(mask, web.FileField):
        return problem(400, "mask: a PNG file field is required")
    try:
        position = int(str(form.get("position", "")))
    except ValueError:
        return problem(400, f"position {form.get('position')!r}: an integer")
    data = await asyncio.to_thread(mask.file.read)
    log_ = session.log(annotator)
    try:
        answer = await asyncio.to_thread(log_.record, position, str(form.get("image", "")), str(form.get("decision", "")),
                                         form.get("time_ms", ""), data)  # fmt: skip
    except AlreadyAnswered as error:
        return problem(409, str(error), next=progress(session, annotator))
    except AnnotationError as error:
        return problem(400, str(error))
    return web.json_response({"saved": {k: answer[k] for k in ("position", "image", "decision", "marked_fraction")},
                              "next": progress(session, annotator)})  # fmt: skip


# ---- check a photo -------------------------------------------------------------------------------
async def post_check(request: web.Request) -> web.Response:
    config: AppConfig = request.app[CONFIG]
    if config.checker is None:
        return problem(404, "the check page is off (start `cyborg annotate` with --server)")
    form = await request.post()
    photo = form.get("image")
    if not isinstance(photo, web.FileField):
        return problem(400, "image: a file field is required")
    data = await asyncio.to_thread(photo.file.read)
    if not data:
        return problem(400, "image: empty file")
    if len(data) > MAX_PHOTO_BYTES:
        return problem(413, f"image: {len(data)} bytes, at most {MAX_PHOTO_BYTES}")
    try:
        result = await asyncio.to_thread(config.checker, data)
    except UserError as error:
        return problem(getattr(error, "status", 502), str(error))
    return web.json_response(result)


class PhotoChecker:
    """Sends a photo to the gRPC server (serving.client, the options of `cyborg detect`) and returns
    the page's JSON: verdict, calibrated probability, operating point, model, the heatmap overlay, and
    for a photo (input kind auto or photo) every face the server found, with its own verdict."""

    def __init__(self, server: str, *, model: str = "", version: int = 0, operating_point: str = "", input_kind: str = "auto",
                 tls_ca=None, tls_cert=None, tls_key=None, token: str | None = None, timeout: float = 30.0):  # fmt: skip
        from serving.client import DetectorClient

        self.server = server
        self.options = {"model": model, "version": version, "operating_point": operating_point, "input_kind": input_kind}
        self.client = DetectorClient(server, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token, timeout=timeout, retries=1)
        self._model_info: dict[str, dict[str, Any]] = {}

    def __call__(self, data: bytes) -> dict[str, Any]:
        from serving.client import ClientError

        try:
            result = self.client.detect(data, heatmap="overlay", **self.options)
        except ClientError as error:
            failure = UserError(f"{self.server}: {error}")
            failure.status = 400 if error.code.name in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED") else 502
            raise failure from error
        answer = result.to_dict()  # a photo's faces, each with its box, status and verdict, come with it
        answer.pop("image", None)
        answer.setdefault("input_kind", "aligned")
        if result.heatmap_png:
            answer["heatmap"] = "data:image/png;base64," + base64.b64encode(result.heatmap_png).decode()
        answer["saliency"] = self.saliency(result.model, result.version)
        return answer

    def saliency(self, model: str, version: int) -> str | None:
        """What guided the model's training ("human", "proxy", "none"), from its model.json."""
        key = f"{model}/{version}"
        if key not in self._model_info:
            try:
                self._model_info[key] = {"saliency": self.client.get_model(model, version).get("saliency") or None}
            except Exception:  # noqa: BLE001 - the verdict matters, this detail does not
                self._model_info[key] = {"saliency": None}
        return self._model_info[key]["saliency"]

    def close(self) -> None:
        self.client.close()
