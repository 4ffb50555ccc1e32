"""The playground's side of the server: its page and the endpoints that look inside the model.

    GET  /                  the page (gemma3/serve/ui/index.html); off with `gemma3 serve --no-ui`
    GET  /ui/{name}         its script, style sheet and pictures: files of gemma3/serve/ui/, nothing else
    GET  /v1/inside/model   what the page needs to ask: layer kinds, the window, the bounds
    POST /v1/inside         one token of a text looked at from inside (gemma3.eval.inside)

The page holds no secret and needs no key; the API key is typed into it and sent as the Authorization header,
so the inside endpoints take it like every other API route. Every UI answer carries a Content-Security-Policy
that allows only the package's own script and style: whatever the model writes is put in the page as text by
the script (ui/markdown.js builds DOM nodes, never HTML), and even a slip there could not run an inline script
or load anything from elsewhere.

A look inside runs a plain forward over the text with hooks on its layers, so it runs on the scheduler's thread
between two turns (Scheduler.run_exclusive): bounded in tokens (--inside-tokens) and in time (--inside-seconds,
checked before each layer); one may wait while another runs, a third gets 429.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gemma3.config import SLIDING
from gemma3.errors import Gemma3Error
from gemma3.eval.inside import DeadlinePassed, look_inside
from gemma3.serve.protocol import MAX_INSIDE_TOP_K, APIError, InsideRequest
from gemma3.serve.scheduler import QueueFull

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache"}
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon"}


def ui_files() -> dict[str, bytes]:
    """The page's files by name, read once from the package (a name outside this dict is a 404: no paths)."""
    folder = resources.files("gemma3.serve") / "ui"
    files = {}
    if folder.is_dir():
        for entry in folder.iterdir():
            suffix = "." + entry.name.rpartition(".")[2]
            if entry.is_file() and suffix in _TYPES and not entry.name.startswith("."):
                files[entry.name] = entry.read_bytes()
    return files


def ui_routes() -> list[Route]:
    files = ui_files()
    if "index.html" not in files:
        raise Gemma3Error("the playground's files are missing from the package (gemma3/serve/ui/index.html)")

    def answer(name: str) -> Response:
        return Response(files[name], media_type=_TYPES["." + name.rpartition(".")[2]], headers=_HEADERS)

    async def page(request: HTTPRequest):
        return answer("index.html")

    async def asset(request: HTTPRequest):
        name = request.path_params["name"]
        if name not in files:
            raise APIError(404, f"no file {name!r} in the playground", code="not_found")
        return answer(name)

    return [Route("/", page, methods=["GET"]), Route("/ui/{name}", asset, methods=["GET"])]


class InsideEndpoints:
    """The two /v1/inside routes of a server (`server`: gemma3.serve.app._Server, for its key check, body
    reader and tokenizer)."""

    def __init__(self, server, max_tokens: int, max_seconds: float):
        self.server, self.max_tokens, self.max_seconds = server, max_tokens, max_seconds

    def routes(self) -> list[Route]:
        return [Route("/v1/inside/model", self.model_info, methods=["GET"]),
                Route("/v1/inside", self.inside, methods=["POST"])]

    async def model_info(self, request: HTTPRequest):
        self.server._authorize(request)
        config = self.server.scheduler.model.config
        return JSONResponse({"model": self.server.config.model_name,
                             "layer_types": [_kind(t) for t in config.layer_types],
                             "sliding_window": config.sliding_window, "max_tokens": self.max_tokens,
                             "max_top_k": MAX_INSIDE_TOP_K, "context": self.server.scheduler.context})

    async def inside(self, request: HTTPRequest):

        server = self.server
        body: InsideRequest = await server._body(request, InsideRequest)
        if self.max_tokens < 1:
            raise APIError(400, "looking inside the model is off on this server (--inside-tokens 0)",
                           code="inside_disabled")
        if len(body.tokens) > server.scheduler.context:
            raise APIError(400, f"tokens: {len(body.tokens)} ids, more than the {server.scheduler.context}-token "
                                "context", param="tokens")
        if body.position > len(body.tokens):
            raise APIError(400, f"position is {body.position}, past the {len(body.tokens)} tokens given",
                           param="position")
        if body.position > self.max_tokens:
            raise APIError(400, f"position is {body.position}: the inside view reads at most {self.max_tokens} "
                                "tokens (--inside-tokens)", param="position")
        server._check_ids(body.tokens, "tokens")
        config = server.scheduler.model.config
        layers = body.layers
        if layers is not None:
            bad = next((i for i in layers if not 0 <= i < config.num_hidden_layers), None)
            if bad is not None:
                raise APIError(400, f"layers: layer {bad} is outside [0, {config.num_hidden_layers})",
                               param="layers")
            layers = list(dict.fromkeys(layers))
        ids, position, top_k, vocab = body.tokens, body.position, body.top_k, server.scheduler.vocab
        seconds = self.max_seconds

        def job(model):
            return look_inside(model, ids, position, top_k, layers, vocab=vocab, deadline=time.monotonic() + seconds)

        start = time.perf_counter()
        try:
            future = server.scheduler.run_exclusive(job)
        except QueueFull as e:
            raise APIError(429, str(e), code="server_busy", kind="rate_limit_error") from None
        except Gemma3Error as e:
            raise APIError(503, str(e), kind="server_error") from None
        try:
            result = await asyncio.wrap_future(future)
        except DeadlinePassed:
            raise APIError(503, f"looking inside took longer than its {seconds:g} s bound (--inside-seconds); "
                                "try a shorter text", code="inside_timeout", kind="server_error") from None
        except Gemma3Error as e:
            raise APIError(503 if "shutting down" in str(e) else 400, str(e), kind="server_error") from None
        finally:
            future.cancel()  # the client went away before it ran: it is skipped
        return JSONResponse(self._body(result, ids, config, time.perf_counter() - start))

    def _body(self, result, ids, config, elapsed: float) -> dict:
        tok = self.server.tokenizer

        def piece(i: int) -> str:
            return tok.decode([i])

        def entry(i: int, p: float) -> dict:
            return {"id": i, "piece": piece(i), "prob": p}

        token = None if result.token_id is None else entry(result.token_id, result.token_prob)
        return {
            "position": result.position, "token": token,
            "candidates": [{**entry(i, p), "logprob": lp} for i, p, lp in result.candidates],
            "lens": [{"layer": "embedding" if n == 0 else n - 1, **entry(i, p), "token_prob": tp}
                     for n, (i, p, tp) in enumerate(result.lens)],
            "attention": [{"layer": i, "kind": _kind(config.layer_types[i]),
                           "window": config.sliding_window if config.layer_types[i] == SLIDING else None,
                           "weights": weights} for i, weights in result.attention.items()],
            "pieces": [piece(i) for i in ids],
            "elapsed_ms": elapsed * 1000}


def _kind(layer_type: str) -> str:
    """A layer's kind in the page's words: "sliding" or "global" (the config's are HF's, "sliding_attention"...)."""
    return "sliding" if layer_type == SLIDING else "global"
