"""The FastAPI app: OpenAI's /v1/models, /v1/chat/completions, /v1/completions, /health, and the
chat page at / (assets/webui: plain HTML and JS over the same API, no external resources).

Bodies are read by hand (size-capped) and validated with pydantic, so every bad request gets an
OpenAI-shaped error with the right status instead of FastAPI's default 422 shape. The `model`
field is only ever looked up in the table of served names: a client cannot name a path.
"""

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from tunelab.errors import TunelabError
from tunelab.generation import SamplingConfig
from tunelab.serving.batching import Batcher, Job, QueueFull
from tunelab.serving.protocol import APIError, ChatRequest, CompletionRequest, validation_error


WEBUI = {"chat.js": "text/javascript", "chat.css": "text/css"}  # what /ui/ serves: this table, never a path
# the page may load only its own script and style and talk only to this server
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def webui_file(name: str) -> bytes:
    from importlib.resources import files

    return (files("tunelab") / "assets" / "webui" / name).read_bytes()


@dataclass
class Limits:
    max_body_bytes: int = 1_000_000
    max_tokens: int = 4096
    """Largest max_tokens a request may ask for (and the default cap when it asks for none)."""
    max_prompt_strings: int = 32
    """A /v1/completions request may hold several prompts; at most this many."""


def create_app(engine, batcher: Batcher, api_key: str | None = None, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    created = int(time.time())

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await run_in_threadpool(batcher.stop)

    app = FastAPI(title="tunelab serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", "server_error").body(),
                            status_code=500)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>' "
                                "(the OpenAI client's api_key)", "authentication_error", code="invalid_api_key")

    async def read_body(request: Request, model_cls):
        check_key(request)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise APIError(413, f"the request body is {declared} bytes; the limit is {limits.max_body_bytes}",
                           code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise APIError(413, f"the request body exceeds {limits.max_body_bytes} bytes", code="body_too_large")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks) or b"null")
        except (ValueError, RecursionError):
            raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            return model_cls.model_validate(data)
        except ValidationError as e:
            raise validation_error(e.errors(include_url=False)) from None
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply") from None

    def adapter_for(model: str) -> str | None:
        if model not in engine.models:
            raise APIError(404, f"The model '{model}' does not exist; this server serves: "
                                f"{', '.join(engine.models)}", "invalid_request_error", "model", "model_not_found")
        return engine.models[model]

    def budget(prompt_len: int, wanted: int | None, what: str) -> int:
        ctx = engine.context_length
        if wanted is not None and wanted > limits.max_tokens:
            raise APIError(400, f"max_tokens is {wanted}; this server allows at most {limits.max_tokens}",
                           param="max_tokens", code="max_tokens_too_large")
        if wanted is None:
            if prompt_len >= ctx:
                wanted = 1  # falls into the overflow message below
            else:
                return min(limits.max_tokens, ctx - prompt_len)
        if prompt_len + wanted > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{prompt_len + wanted} tokens ({prompt_len} in the {what}, {wanted} in the "
                                "completion). Please reduce the length of the "
                                f"{what} or completion.", param=what, code="context_length_exceeded")
        return wanted

    def samplings(req, max_new: int) -> list[SamplingConfig]:
        max_n = getattr(engine, "max_n", None)
        if max_n is not None and req.n > max_n:
            raise APIError(400, f"this engine returns at most n={max_n} choices per request", param="n")
        extra = req.model_extra or {}
        top_k = extra.get("top_k", 0)
        rep = extra.get("repetition_penalty", 1.0)
        if not isinstance(top_k, int) or top_k < 0 or not isinstance(rep, (int, float)) or not 0 < rep <= 10:
            raise APIError(400, "top_k must be an integer >= 0 and repetition_penalty a number in (0, 10]",
                           param="top_k")
        temp = 1.0 if req.temperature is None else req.temperature  # OpenAI's default
        return [SamplingConfig(max_new_tokens=max_new, temperature=temp, top_p=req.top_p or 1.0, top_k=top_k,
                               repetition_penalty=float(rep),
                               seed=None if req.seed is None else (req.seed + i) % 2 ** 63)
                for i in range(req.n)]

    def submit(jobs: list[Job]) -> None:
        try:
            batcher.submit(jobs)
        except QueueFull as e:
            raise APIError(503, f"The server is busy ({e}); retry shortly", "server_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None

    # ---- endpoints --------------------------------------------------------------------
    @app.get("/")
    async def chat_page():
        return Response(webui_file("chat.html"), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/ui/{name}")
    async def chat_page_asset(name: str):
        if name not in WEBUI:
            raise HTTPException(404, f"no such file: /ui/{name}")
        return Response(webui_file(name), media_type=f"{WEBUI[name]}; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(engine.models), "queued": batcher.queued,
                "active": batcher.active_rows, "peak_batch": batcher.peak_rows, "tokens": batcher.tokens}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [_model_card(m, created) for m in engine.models]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        check_key(request)
        adapter_for(model_id)
        return _model_card(model_id, created)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await read_body(request, ChatRequest)
        adapter = adapter_for(req.model)
        if req.tools or req.functions:
            raise APIError(400, "tools / function calling are not supported by this server", param="tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise APIError(400, "response_format other than text is not supported", param="response_format")
        if req.logprobs and not engine.supports_logprobs:
            raise APIError(400, "this engine cannot return logprobs", param="logprobs")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            prompt = await run_in_threadpool(engine.chat_ids, messages)
        except TunelabError as e:
            raise APIError(400, str(e), param="messages") from None
        max_new = budget(len(prompt), req.wanted_tokens(), "messages")
        top = (req.top_logprobs or 0) if req.logprobs else -1
        return await run_jobs(request, req, [(prompt, 0)], samplings(req, max_new), adapter, top, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read_body(request, CompletionRequest)
        adapter = adapter_for(req.model)
        if req.suffix or (req.best_of or 1) > 1:
            raise APIError(400, "suffix and best_of are not supported", param="suffix" if req.suffix else "best_of")
        if req.logprobs is not None and not engine.supports_logprobs:
            raise APIError(400, "this engine cannot return logprobs", param="logprobs")
        prompts = _prompt_list(req.prompt, limits.max_prompt_strings, engine.vocab_size)
        encoded = []
        for p in prompts:
            encoded.append(p if isinstance(p, list) else await run_in_threadpool(engine.text_ids, p))
        if any(not ids for ids in encoded):
            raise APIError(400, "a prompt is empty", param="prompt")
        max_new = min(budget(len(ids), req.wanted_tokens(), "prompt") for ids in encoded)
        top = req.logprobs if req.logprobs is not None else -1
        echo = [engine.decode(ids) if req.echo else "" for ids in encoded]
        return await run_jobs(request, req, [(ids, i * req.n) for i, ids in enumerate(encoded)],
                              samplings(req, max_new), adapter, top, chat=False, echo=echo)

    async def run_jobs(request: Request, req, prompts, samp, adapter, top, chat: bool, echo=None):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(ev):
            loop.call_soon_threadsafe(events.put_nowait, ev)

        jobs = [Job(ids, samp, emit, adapter, req.stops(), top, first) for ids, first in prompts]
        submit(jobs)
        total = sum(j.n for j in jobs)
        usage = {"prompt_tokens": sum(len(j.prompt) for j in jobs), "completion_tokens": 0}
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        shape = _Shape(rid, req.model, int(time.time()), chat, engine)

        def cancel():
            for j in jobs:
                j.cancelled.set()

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def sse():
                try:
                    if chat:
                        for i in range(total):
                            yield shape.sse(shape.chunk(i, {"role": "assistant", "content": ""}))
                    elif echo and any(echo):
                        for i in range(total):
                            yield shape.sse(shape.chunk(i, echo[i // req.n]))
                    done = 0
                    while done < total:
                        ev = await events.get()
                        if ev[0] == "error":
                            yield shape.sse(APIError(500, ev[1], "server_error").body())
                            return
                        if ev[0] == "delta":
                            _, i, text, picks = ev
                            yield shape.sse(shape.chunk(i, {"content": text} if chat else text,
                                                        logprobs=shape.logprobs(picks, top) if top >= 0 else None))
                        else:
                            _, i, finish, n_tok = ev
                            usage["completion_tokens"] += n_tok
                            done += 1
                            yield shape.sse(shape.chunk(i, {} if chat else "", finish=finish))
                    if include_usage:
                        yield shape.sse(shape.usage_chunk(usage))
                    yield "data: [DONE]\n\n"
                finally:
                    cancel()  # a client that went away stops its rows at the next step

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        texts = {i: [] for i in range(total)}
        picks = {i: [] for i in range(total)}
        finish = {}
        next_check = time.monotonic() + 0.25
        try:
            while len(finish) < total:
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    ev = None
                if time.monotonic() >= next_check:  # tokens may flow without pause: check on a clock
                    next_check = time.monotonic() + 0.25
                    if await request.is_disconnected():
                        cancel()
                        return JSONResponse(APIError(499, "client disconnected").body(), status_code=499)
                if ev is None:
                    continue
                if ev[0] == "error":
                    raise APIError(500, ev[1], "server_error")
                if ev[0] == "delta":
                    texts[ev[1]].append(ev[2])
                    picks[ev[1]].extend(ev[3])
                else:
                    finish[ev[1]] = ev[2]
                    usage["completion_tokens"] += ev[3]
        finally:
            cancel()
        return shape.full(texts, picks, finish, usage, top, echo, req.n)

    return app


def _prompt_list(prompt, max_strings: int, vocab: int) -> list:
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(x, int) for x in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts or len(prompts) > max_strings:
        raise APIError(400, f"give 1 to {max_strings} prompts", param="prompt")
    for p in prompts:
        if isinstance(p, list) and any(not 0 <= t < vocab for t in p):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
    return prompts


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "tunelab"}


@dataclass
class _Shape:
    """Response bodies for one request."""

    rid: str
    model: str
    created: int
    chat: bool
    engine: object

    @staticmethod
    def sse(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def _head(self, chunk: bool) -> dict:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": "tunelab"}

    def chunk(self, index: int, delta, finish: str | None = None, logprobs=None) -> dict:
        choice = {"index": index, "logprobs": logprobs, "finish_reason": finish}
        if self.chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head(True), "choices": [], "usage": _usage(usage)}

    def logprobs(self, picks: list, top: int):
        dec = self.engine.decode
        if self.chat:
            return {"content": [{"token": dec([p.token]), "logprob": p.logprob,
                                 "bytes": list(dec([p.token]).encode()),
                                 "top_logprobs": [{"token": dec([t]), "logprob": lp, "bytes": list(dec([t]).encode())}
                                                  for t, lp in (p.top or [])[:top]]} for p in picks]}
        tokens = [dec([p.token]) for p in picks]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [p.logprob for p in picks],
                "top_logprobs": [{dec([t]): lp for t, lp in (p.top or [])} for p in picks], "text_offset": offsets}

    def full(self, texts, picks, finish, usage, top, echo, n) -> dict:
        choices = []
        for i in sorted(texts):
            text = "".join(texts[i])
            lp = self.logprobs(picks[i], top) if top >= 0 else None
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": lp, "finish_reason": finish[i]})
            else:
                prefix = echo[i // n] if echo else ""
                choices.append({"index": i, "text": prefix + text, "logprobs": lp, "finish_reason": finish[i]})
        return {**self._head(False), "choices": choices, "usage": _usage(usage)}


def _usage(u: dict) -> dict:
    return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
            "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}
