"""The HTTP application: a FastAPI app over a :class:`~i2v_cli.serve.service.Service`, behind the
:class:`~i2v_cli.serve.guard.Guard` middleware. Every error is a JSON body ``{"error": "..."}``: 4xx for what the
client sent, 5xx for the server's own failures, and the server stays up either way.

Routes (OpenAPI at ``/openapi.json``, browsable at ``/docs``):

- ``GET /healthz``: models loaded, what runs them, the index, the batches run;
- ``POST /v1/tag``: multipart ``image`` (one or several), the records of ``i2v tag``;
- ``POST /v1/features``: the records of ``i2v features`` (``binary=true``: packed bits as integers);
- ``GET|POST /v1/search``: the booru query of ``i2v search``, ``like`` an indexed image's id;
- ``POST /v1/similar``: the indexed images most similar to an uploaded one;
- ``GET /v1/images/{id}``, ``/v1/images/{id}/thumb``, ``/v1/images/{id}/info``: an indexed image by id only;
- ``GET /``: the web page (:mod:`i2v_cli.serve.page`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, File, Form, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import I2VError
from ..features import record_json
from ..index import DamagedIndexError
from ..query import QueryError
from ..tags import Selection
from ..writers import Record
from .batcher import BatcherClosed
from .guard import COOKIE, Guard, Throttle, client_address, token_ok
from .service import Busy, NotFound, Service

T = TypeVar("T")

#: Results of a search without ``like`` when ``k`` is not given (``like`` gives 10).
DEFAULT_K = 100
MAX_K = 10_000
_MEDIA = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp",
          "TIFF": "image/tiff", "MPO": "image/jpeg"}  # fmt: skip
_SAFE_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'"}


class ApiError(HTTPException):
    """An error answered as ``{"error": detail}`` with ``status_code``."""


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload, ensure_ascii=False, allow_nan=False), status, media_type="application/json")


def records_response(records: Sequence[Record]) -> Response:
    """``{"records": [...]}``; when no image of the request could be used, 422 with ``error`` saying why."""
    body = '{"records": [' + ", ".join(record_json(r) for r in records) + "]}"
    if records and all("error" in r for r in records):
        first = json.loads(record_json(records[0]))["error"]
        error = first if len(records) == 1 else f"none of the {len(records)} images could be read; first: {first}"
        body = json.dumps({"error": error}, ensure_ascii=False)[:-1] + ", " + body[1:]
        return Response(body, 422, media_type="application/json")
    return Response(body, 200, media_type="application/json")


#: The routes that take images as multipart uploads: any other body is 415, not a 422 about a missing field.
UPLOAD_ROUTES = frozenset({"/v1/tag", "/v1/features", "/v1/similar"})
#: How often a request waiting for its images checks that its client is still there (seconds).
DISCONNECT_POLL_S = 0.1

#: The largest image id: SQLite's rowids are 64-bit (a larger one was an OverflowError, a 500).
MAX_ID = 2**63 - 1
#: The last page of the gallery that may be asked for: far beyond any index.
MAX_PAGE = 10**9


class SearchBody(BaseModel):
    """``POST /v1/search``: the same fields as ``GET /v1/search``'s query."""

    q: str = ""
    like: int | None = Field(None, ge=0, le=MAX_ID)
    k: int | None = Field(None, ge=1, le=MAX_K)
    threshold: float = Field(0.5, ge=0.0, le=1.0)


def create_app(service: Service, *, token: str | None = None, allowed_origins: Sequence[str] = ()) -> Any:
    """The ASGI application: routes over ``service``, wrapped in the guard (token, Host, Origin, body limit);
    ``allowed_origins`` (as :func:`~i2v_cli.serve.guard.origin_of` spells them) may POST from a browser too."""
    settings = service.settings
    throttle = Throttle()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(service.close)  # after uvicorn let the in-flight requests finish

    app = FastAPI(title="i2v", version=__version__, lifespan=lifespan, redoc_url=None,
                  description="Tag anime-style illustrations, extract features, search an index.")  # fmt: skip

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        return json_response({"error": str(exc.detail)}, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.url.path in UPLOAD_ROUTES and ctype != "multipart/form-data":  # JSON, a raw image, nothing
            where = f"not {ctype}" if ctype else "no Content-Type was given"
            message = f"send the images as multipart/form-data, in the field 'image' ({where})"
            return json_response({"error": message}, 415)
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "request"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return json_response({"error": "; ".join(parts)}, 422)

    @app.exception_handler(QueryError)
    async def query_error(_: Request, exc: QueryError) -> Response:
        return json_response({"error": str(exc)}, 400)

    @app.exception_handler(NotFound)
    async def not_found(_: Request, exc: NotFound) -> Response:
        return json_response({"error": str(exc)}, 404)

    @app.exception_handler(Busy)
    async def busy(_: Request, exc: Busy) -> Response:
        response = json_response({"error": str(exc)}, 503)
        response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(I2VError)
    async def i2v_error(_: Request, exc: I2VError) -> Response:
        return json_response({"error": str(exc)}, 400)

    @app.exception_handler(DamagedIndexError)
    async def damaged_index(_: Request, exc: DamagedIndexError) -> Response:
        return json_response({"error": str(exc)}, 500)  # the server's data, not the request, is at fault

    @app.exception_handler(BatcherClosed)
    async def closing(_: Request, exc: BatcherClosed) -> Response:
        return json_response({"error": str(exc)}, 503)

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> Response:
        return json_response({"error": f"internal error: {type(exc).__name__}: {exc}"}, 500)

    async def timed(request: Request, work: Awaitable[T]) -> T:
        """``work`` within the request timeout, cancelled when the client goes away first: the images of a request
        nobody waits for any more are dropped from the batcher's queue, not decoded and run for nothing."""
        task = asyncio.ensure_future(work)
        deadline = asyncio.get_running_loop().time() + settings.request_timeout_s
        try:
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    raise ApiError(503, f"the request took over {settings.request_timeout_s:g} s: try again")
                done, _ = await asyncio.wait({task}, timeout=min(left, DISCONNECT_POLL_S))
                if done:
                    return task.result()
                if await request.is_disconnected():
                    raise ApiError(499, "the client went away")  # answered to no one
        finally:
            if not task.done():
                task.cancel()

    async def read_uploads(files: list[UploadFile]) -> list[tuple[str, bytes]]:
        if not files:
            raise ApiError(400, "no image: send the files as multipart field 'image'")
        if len(files) > settings.max_files:
            raise ApiError(413, f"{len(files)} images in one request; the limit is {settings.max_files}")
        from .uploads import upload_name

        return [(upload_name(f.filename, i), await f.read()) for i, f in enumerate(files)]

    def need(model: str) -> None:
        if model not in service.nets:
            raise ApiError(404, f"no {model} model is loaded: start i2v serve with --{model}-weights")

    def index() -> Any:
        if service.index is None:
            raise ApiError(404, "no index: start i2v serve with --db FILE")
        return service.index

    @app.head("/healthz", include_in_schema=False)  # what load balancers and uptime checks send
    @app.get("/healthz")
    async def healthz() -> Response:
        """Models loaded (and what runs them), the index, the batches run so far."""
        health = await run_in_threadpool(service.health)
        return json_response(health, 200 if health["status"] == "ok" else 503)

    @app.post("/v1/tag")
    async def tag(
        request: Request,
        image: list[UploadFile] = File(..., description="One or several image files."),  # noqa: B008
        threshold: float | None = Query(None, ge=0.0, le=1.0, description="Default 0.5 (0 with top_k)."),
        general_threshold: float | None = Query(None, ge=0.0, le=1.0),
        character_threshold: float | None = Query(None, ge=0.0, le=1.0),
        copyright_threshold: float | None = Query(None, ge=0.0, le=1.0),
        top_k: int | None = Query(None, ge=1, description="At most K tags per category."),
    ) -> Response:
        """The records of ``i2v tag`` for the uploaded images, in order; a bad image has ``{"path", "error"}``."""
        need("tag")
        selection = Selection.make(threshold, general=general_threshold, character=character_threshold,
                                   copyright=copyright_threshold, top_k=top_k)  # fmt: skip
        uploads = await read_uploads(image)
        results = await timed(request, service.run("tag", uploads))
        return records_response(service.tag_records(results, selection))

    @app.post("/v1/features")
    async def features(
        request: Request,
        image: list[UploadFile] = File(..., description="One or several image files."),  # noqa: B008
        binary: bool = Query(False, description="Packed bits (the binary feature) instead of float32 values."),
    ) -> Response:
        """The records of ``i2v features`` (``{"path", "feature": [...]}``) for the uploaded images."""
        need("feature")
        uploads = await read_uploads(image)
        results = await timed(request, service.run("feature", uploads))
        return records_response(service.feature_records(results, binary))

    def run_search(q: str, like: int | None, k: int | None, threshold: float) -> Response:
        hits = index().search(q, threshold=threshold, like=like, k=k or (10 if like is not None else DEFAULT_K))
        return json_response({"results": hits})

    @app.get("/v1/search")
    def search_get(
        q: str = Query("", description="Booru-style query: long_hair -glasses tag>=0.8 rating:safe"),
        like: int | None = Query(None, ge=0, le=MAX_ID, description="Rank by similarity to this indexed image's id."),
        k: int | None = Query(None, ge=1, le=MAX_K, description="At most K results (default 100; 10 with like)."),
        threshold: float = Query(0.5, ge=0.0, le=1.0, description="The score a bare tag term must reach."),
    ) -> Response:
        """The indexed images matching a query (path order), or with ``like`` the most similar, best first."""
        return run_search(q, like, k, threshold)

    @app.post("/v1/search")
    def search_post(body: SearchBody) -> Response:
        """As ``GET /v1/search``, with a JSON body."""
        return run_search(body.q, body.like, body.k, body.threshold)

    @app.post("/v1/similar")
    async def similar(
        request: Request,
        image: list[UploadFile] = File(..., description="One image file (several: 422)."),  # noqa: B008
        q: str = Query("", description="Only images matching this query."),
        k: int = Query(10, ge=1, le=MAX_K),
        threshold: float = Query(0.5, ge=0.0, le=1.0),
    ) -> Response:
        """The indexed images most similar to the uploaded one (cosine of the features), best first."""
        need("feature")
        reader = index()
        if len(image) > 1:  # the last one was used, silently: the others' neighbours were never asked for
            raise ApiError(422, f"/v1/similar takes one image; {len(image)} were sent (one request per image)")
        (result,) = await timed(request, service.run("feature", await read_uploads(image)))
        if result.output is None:
            raise ApiError(422, result.error or "the image cannot be read")
        hits = await run_in_threadpool(lambda: reader.search(q, threshold=threshold, like=result.output, k=k))
        return json_response({"results": hits})

    @app.get("/v1/images/{image_id}")
    def image_file(image_id: int = Path(ge=0, le=MAX_ID)) -> Response:
        """The file of indexed image ``image_id`` (by id only), as it was indexed."""
        data, fmt = index().open_file(image_id)
        return Response(data, media_type=_MEDIA.get(fmt or "", "application/octet-stream"), headers=_SAFE_HEADERS)

    @app.get("/v1/images/{image_id}/thumb")
    def image_thumb(image_id: int = Path(ge=0, le=MAX_ID)) -> Response:
        """A JPEG thumbnail (256 pixels a side at most) of indexed image ``image_id``."""
        return Response(index().thumbnail(image_id), media_type="image/jpeg",
                        headers={**_SAFE_HEADERS, "Cache-Control": "private, max-age=300"})  # fmt: skip

    @app.get("/v1/images/{image_id}/info")
    def image_info(image_id: int = Path(ge=0, le=MAX_ID), threshold: float = Query(0.5, ge=0.0, le=1.0)) -> Response:
        """Indexed image ``image_id``'s record (tags at ``threshold``, as ``i2v tag`` writes them), size, format."""
        record = index().info(image_id, Selection.make(threshold), index().index.tags)
        return Response(record_json(record), media_type="application/json")

    @app.get("/", response_class=HTMLResponse)
    def page(q: str = "", page: int = Query(0, ge=0, le=MAX_PAGE)) -> HTMLResponse:
        """The web page: the index's gallery, a tag search, an image's tags and neighbours, a drop zone."""
        from .page import render_page

        return HTMLResponse(render_page(service, q, page))

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        """The page's script and style (two fixed files; no other name is served)."""
        from .page import static_file

        found = static_file(name)
        if found is None:
            raise ApiError(404, "no such file")
        return Response(found[0], media_type=found[1])

    @app.post("/login")
    def login(request: Request, token_value: str = Form("", alias="token")) -> Response:
        """The page's sign-in: the token, once, sets a cookie (HttpOnly, SameSite=Strict) that the page sends."""
        if not token or not token_ok(token, f"Bearer {token_value}"):
            throttle.failed(client_address(request.scope))
            raise ApiError(401, "wrong token")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token_value, httponly=True, samesite="strict")
        return response

    return Guard(app, token=token, max_body=settings.max_upload_bytes, timeout=settings.request_timeout_s,
                 throttle=throttle, allowed_origins=allowed_origins)  # fmt: skip
