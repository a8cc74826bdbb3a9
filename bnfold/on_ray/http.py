"""The model server's HTTP API (FastAPI): ``POST /predict``, ``GET /metadata``, ``GET /health``.

Every answer to a request that fails is one line of JSON, ``{"error": "..."}``, with a 4xx status
for what the client can fix (401 token, 400 input, 408 body not received in time, 413 body too
large or decoding to too many elements, 415 media type) and 500
for a bug, whose traceback goes to the server log only. With a token, ``/predict`` and
``/metadata`` answer 401 before reading the body; ``/health`` stays open for load balancers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import BnfoldError, first_line
from ..predictor import Predictor
from .auth import authorized
from .bodies import BodyReaders, RequestError
from .payloads import ARRAY_TYPES, ARRAYS, TooLargeError, answer, body_kind, decode_body, json_bytes

# Serve's replica logger: what it logs lands in the replica's log file (with the request id).
logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class ApiSettings:
    """How the API answers: the largest body it reads and how long it waits for one, the digest
    of the bearer token it wants (``None``: no authentication) and the classes it lists per item
    of a classifier."""

    max_body_bytes: int
    token_digest: str | None
    top_k: int
    body_timeout_s: float

    @property
    def max_elements(self) -> int:
        """The most elements a body may decode to: one per byte of the body limit, which no
        uncompressed array and no JSON body can exceed, so only compressed ``.npz`` files and
        images reach it."""
        return self.max_body_bytes


ENDPOINTS = "POST /predict, GET /metadata, GET /health"


class ModelService(Protocol):
    """What the API serves: a replica's predictor, its batched inference and its metadata."""

    predictor: Predictor

    async def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    def metadata(self) -> dict[str, Any]: ...


def build_api(service: ModelService, settings: ApiSettings) -> FastAPI:
    """The FastAPI app answering for ``service`` (no docs pages: the API is the README's)."""
    app = FastAPI(title="bnfold", docs_url=None, redoc_url=None, openapi_url=None)
    bodies = BodyReaders()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metadata")
    async def metadata(request: Request) -> Response:
        async def describe() -> dict[str, Any]:
            return service.metadata()

        return await _answer(request, settings, describe)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        return await _answer(request, settings, lambda: _predict(request, service, settings, bodies))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """404 and 405 in the API's one error shape, naming the endpoints."""
        message = f"{exc.detail}: {request.method} {request.url.path}; the endpoints are {ENDPOINTS}"
        return _json_response({"error": message}, exc.status_code, exc.headers)

    return app


async def _answer(request: Request, settings: ApiSettings, work: Callable[[], Awaitable[dict[str, Any]]]) -> Response:
    """``work``'s JSON answer once the request is authorized; errors as one-line JSON."""
    if not authorized(request.headers.get("authorization"), settings.token_digest):
        return _json_response(
            {"error": "missing or wrong bearer token: send the header Authorization: Bearer TOKEN"},
            401,
            {"WWW-Authenticate": "Bearer"},
        )
    try:
        return _json_response(await work())
    except RequestError as exc:
        return _json_response({"error": str(exc)}, exc.status, exc.headers)
    except TooLargeError as exc:
        return _json_response({"error": str(exc)}, 413)
    except BnfoldError as exc:  # the input does not fit the model
        return _json_response({"error": first_line(exc)}, 400)
    except Exception:
        logger.exception("bnfold: internal error answering %s %s", request.method, request.url.path)
        return _json_response({"error": "internal error; the server log has the traceback"}, 500)


async def _predict(
    request: Request, service: ModelService, settings: ApiSettings, bodies: BodyReaders
) -> dict[str, Any]:
    """Read the body (see :mod:`bnfold.on_ray.bodies`), decode it (off the event loop unless it
    is a cheap array file), run it batched with other requests, and answer with its outputs."""
    kind = body_kind(request.headers.get("content-type"))
    if kind is None:
        raise RequestError(
            415,
            f"unsupported Content-Type {request.headers.get('content-type')!r}: send application/json, "
            f"{', '.join(ARRAY_TYPES)} or an image/* file",
        )
    body = await bodies.read(request, settings.max_body_bytes, settings.body_timeout_s)
    predictor = service.predictor
    if kind == ARRAYS:
        feeds = decode_body(body, kind, predictor, settings.max_elements)
    else:  # JSON and images take milliseconds to decode: the event loop keeps batching meanwhile
        feeds = await asyncio.to_thread(decode_body, body, kind, predictor, settings.max_elements)
    outputs = await service.infer(feeds)
    return answer(outputs, predictor, settings.top_k)


def _json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json_bytes(body), status_code=status, headers=headers, media_type="application/json")
