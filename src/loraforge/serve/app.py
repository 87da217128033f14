"""The OpenAI-compatible HTTP server: FastAPI routes over one `EngineWorker`.

    GET  /v1/models                   the base and every adapter in the store (parent: the base)
    POST /v1/completions              prompt -> text; `model` is an adapter name or the base's
    POST /v1/chat/completions         messages -> the assistant's turn, through the model's chat template
    POST /admin/adapters/{name}/load | /replace,  DELETE /admin/adapters/{name}    (key required)
    GET  /health, /metrics            liveness; Prometheus text: queue depth, active requests, tokens/s, adapters

Every error has OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 401 without the key, 404 for an
unknown model, 400 for a bad body, 413 over the body cap, 429 (with Retry-After) when the bounded queue is full.
A client that goes away cancels its requests; the engine frees their rows at the next step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from loraforge.config import DEFAULT_MODEL
from loraforge.data.chat import chat_prompt_ids, read_system_prompt
from loraforge.errors import LoraforgeError
from loraforge.infer.session import InferenceSession
from loraforge.infer.store import AdapterStore
from loraforge.options import ServeOptions
from loraforge.serve.protocol import BadField, ChatBody, CompletionBody, error_body, new_id, now, usage
from loraforge.serve.text import TextStream
from loraforge.serve.worker import EngineWorker, Job, QueueFull


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, code, param), headers


def create_app(session: InferenceSession, store: AdapterStore | None, options: ServeOptions) -> FastAPI:
    """The app serving `session` (and `store`'s adapters) as `options` say: the base's name is `options.model` (or
    the default model's), and the key is `options.api_key` (None: open, loopback only; admin routes then refuse)."""
    worker = EngineWorker(session, store, max_batch=options.max_batch, max_queue=options.max_queue)
    context = worker.engine.max_positions
    base_name, cap = options.model or DEFAULT_MODEL, options.max_tokens_cap

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()  # uvicorn has finished the requests in flight by now

    app = FastAPI(title="loraforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker

    counts: dict[int, int] = {}  # responses by status code, for /metrics
    app.add_middleware(Guard, api_key=options.api_key, max_body_bytes=options.max_body_kb * 1024, counts=counts)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body, e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{where + ': ' if where else ''}{first.get('msg', 'invalid request body')}"
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_body", where), 400)

    def resolve(model: str) -> str | None:
        """The adapter a request's `model` names (None: the base); 404 for anything else."""
        if model in (base_name, session.base):
            return None
        if store is None:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {base_name!r} "
                                "(start it with --adapters DIR to serve adapters)", code="model_not_found",
                           param="model")
        try:
            store.path(model)
        except LoraforgeError as e:
            raise ApiError(404, f"the model {model!r} does not exist: {e}", code="model_not_found",
                           param="model") from None
        return model

    def check(prompt: list[int], wanted: int | None, default_cap: bool, param: str) -> int:
        """max_tokens for this prompt: the request's, or what fits; 400 when the request cannot fit."""
        if not prompt:
            raise ApiError(400, "the prompt is empty: give at least one token to continue", param=param)
        room = context - len(prompt) if context else cap
        if room < 1:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; this model's context is {context}",
                           code="context_length_exceeded", param=param)
        if wanted is None:
            return min(room, cap) if default_cap else min(16, room)
        if wanted > cap:
            raise ApiError(400, f"max_tokens {wanted} is over this server's cap of {cap}",
                           param="max_tokens")
        if wanted > room:
            raise ApiError(400, f"prompt ({len(prompt)} tokens) + max_tokens ({wanted}) exceeds the model's context "
                                f"of {context} tokens; shorten the prompt or lower max_tokens",
                           code="context_length_exceeded", param="max_tokens")
        return wanted

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        stats = worker.stats()
        lines = [f"# TYPE loraforge_{k} gauge\nloraforge_{k} {v:g}" for k, v in stats.items() if k != "tokens_total"]
        lines.append(f"# TYPE loraforge_generated_tokens_total counter\nloraforge_generated_tokens_total "
                     f"{stats['tokens_total']:g}")
        lines += ["# TYPE loraforge_responses_total counter"] + [
            f'loraforge_responses_total{{code="{code}"}} {n}' for code, n in sorted(counts.items())]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        created = now()
        data = [{"id": base_name, "object": "model", "created": created, "owned_by": "loraforge",
                 "root": session.base, "parent": None}]
        for name in store.names() if store else []:
            data.append({"id": name, "object": "model", "created": created, "owned_by": "loraforge",
                         "root": name, "parent": base_name})
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        adapter = _prepare(body, resolve)
        prompts = _completion_prompts(body.prompt, session.tokenizer)
        limits = [check(p, body.max_tokens, False, "prompt") for p in prompts]
        jobs = [(p, limit, i * body.n + c) for i, (p, limit) in enumerate(zip(prompts, limits)) for c in range(body.n)]
        return await _answer(request, body, "text_completion", adapter, jobs)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        adapter = _prepare(body, resolve)
        messages = [m.as_dict() for m in body.messages]
        if adapter is not None and messages[0]["role"] != "system":
            system = read_system_prompt(store.path(adapter))
            if system is not None:  # the one system prompt the adapter was trained with, as generate does
                messages.insert(0, {"role": "system", "content": system})
        try:
            prompt = chat_prompt_ids(session.tokenizer, messages)
        except LoraforgeError as e:
            raise ApiError(400, str(e), param="messages") from None
        limit = check(prompt, body.wanted_tokens(), True, "messages")
        return await _answer(request, body, "chat.completion", adapter, [(prompt, limit, c) for c in range(body.n)])

    async def _answer(request: Request, body, kind: str, adapter: str | None, specs: list[tuple[list[int], int, int]]):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        jobs, streams = [], []
        for prompt, limit, choice in specs:
            index = len(jobs)
            sink = _sink(loop, events, index)
            try:
                params = body.params(limit, choice)
            except BadField as e:
                raise ApiError(400, str(e), param=e.param) from None
            jobs.append(Job(prompt, adapter, params, sink))
            streams.append(TextStream(session.tokenizer, body.stop_strings()))
        try:
            for job in jobs:
                worker.submit(job)
        except QueueFull as e:
            for job in jobs:
                worker.cancel(job)
            raise ApiError(429, str(e), "rate_limit_error", "queue_full", headers={"Retry-After": "1"}) from None
        reply = _Reply(kind, body.model, jobs, streams, worker, events)
        if body.stream:
            return StreamingResponse(reply.sse(body.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        watcher = asyncio.create_task(_cancel_on_disconnect(request, jobs, worker))
        try:
            return await reply.whole()
        finally:
            watcher.cancel()

    def on_disk(name: str) -> None:
        """404 unless `name` is a valid adapter name with a folder in the store (never a path outside it)."""
        if store is None:
            raise ApiError(400, "this server has no adapter store; start it with --adapters DIR")
        try:
            store.path(name)
        except LoraforgeError as e:
            raise ApiError(404, str(e), code="model_not_found", param="name") from None

    @app.post("/admin/adapters/{name}/load")
    async def load(name: str):
        on_disk(name)
        resident = await _on_engine(worker, lambda: store.ensure([name], pinned=worker.pinned())[0])
        return {"id": name, "resident": resident, "bytes": store.resident.get(resident)}

    @app.post("/admin/adapters/{name}/replace")
    async def replace(name: str):
        on_disk(name)
        resident = await _on_engine(worker, lambda: store.replace(name, pinned=worker.pinned()))
        return {"id": name, "resident": resident, "bytes": store.resident.get(resident)}

    @app.delete("/admin/adapters/{name}")
    async def unload(name: str):
        on_disk(name)
        await _on_engine(worker, lambda: store.unload(name, pinned=worker.pinned()))
        return {"id": name, "resident": None}

    return app


class _Reply:
    """The events of one HTTP request's jobs (its choices), as one JSON body or as SSE chunks."""

    def __init__(self, kind: str, model: str, jobs: list[Job], streams: list[TextStream], worker: EngineWorker,
                 events: asyncio.Queue):
        self.kind, self.model, self.jobs, self.streams, self.worker, self.events = \
            kind, model, jobs, streams, worker, events
        self.id = new_id("chatcmpl" if kind == "chat.completion" else "cmpl")
        self.created = now()
        self.finish: list[str | None] = [None] * len(jobs)
        self.tokens = [0] * len(jobs)

    async def pieces(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice, new text, finish reason or None) until every choice finished."""
        while None in self.finish:
            index, (what, payload) = await self.events.get()
            if self.finish[index] is not None:
                continue  # events after a stop string ended the choice
            stream = self.streams[index]
            if what == "error":
                for job in self.jobs:
                    self.worker.cancel(job)
                raise ApiError(400 if isinstance(payload, LoraforgeError) else 500, str(payload),
                               "invalid_request_error" if isinstance(payload, LoraforgeError) else "server_error",
                               param="model" if isinstance(payload, LoraforgeError) else None)
            if what == "tokens":
                self.tokens[index] += len(payload)
                text = stream.push(payload)
                if stream.finished:
                    self.worker.cancel(self.jobs[index])
                    self.finish[index] = "stop"
                    yield index, text, "stop"
                elif text:
                    yield index, text, None
            else:  # done
                self.finish[index] = payload
                yield index, stream.flush(), payload

    def usage(self) -> dict[str, int]:
        prompt = sum(len(job.prompt_ids) for job in self.jobs)
        return usage(prompt, sum(self.tokens))

    async def whole(self) -> JSONResponse:
        texts = [""] * len(self.jobs)
        async for index, text, _ in self.pieces():
            texts[index] += text
        choices = [self._choice(i, t, self.finish[i], whole=True) for i, t in enumerate(texts)]
        return JSONResponse({"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
                             "choices": choices, "usage": self.usage()})

    async def sse(self, include_usage: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        head = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        try:
            if self.kind == "chat.completion":
                for i in range(len(self.jobs)):
                    yield _frame({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                       "logprobs": None, "finish_reason": None}]})
            async for index, text, finish in self.pieces():
                yield _frame({**head, "choices": [self._choice(index, text, finish, whole=False)]})
            if include_usage:
                yield _frame({**head, "choices": [], "usage": self.usage()})
        except ApiError as e:
            yield _frame(e.body)
        finally:  # the client went away (or the stream ended): free the rows
            for job in self.jobs:
                self.worker.cancel(job)
        yield "data: [DONE]\n\n"

    def _choice(self, index: int, text: str, finish: str | None, whole: bool) -> dict:
        if self.kind == "chat.completion":
            key, value = ("message", {"role": "assistant", "content": text}) if whole else ("delta", {"content": text})
            if not whole and finish is not None and not text:
                value = {}
            return {"index": index, key: value, "logprobs": None, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


def _frame(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _sink(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int):
    def sink(event):
        loop.call_soon_threadsafe(events.put_nowait, (index, event))
    return sink


def _prepare(body, resolve) -> str | None:
    try:
        body.refuse_unsupported()
        body.stop_strings()
    except BadField as e:
        raise ApiError(400, str(e), param=e.param) from None
    return resolve(body.model)


def _completion_prompts(prompt, tokenizer) -> list[list[int]]:
    """OpenAI's four prompt forms: text, texts, token ids, lists of token ids."""
    if isinstance(prompt, str):
        return [list(tokenizer(prompt)["input_ids"])]
    if not prompt:
        raise ApiError(400, "prompt is an empty list", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = [list(tokenizer(p)["input_ids"]) if isinstance(p, str) else list(p) for p in prompt]
    vocab = len(tokenizer)
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
    return prompts


async def _on_engine(worker: EngineWorker, fn):
    """`fn()` on the engine thread between steps; its LoraforgeError becomes a 400."""
    try:
        return await asyncio.wrap_future(worker.call(fn))
    except LoraforgeError as e:
        raise ApiError(400, str(e), param="model") from None


async def _cancel_on_disconnect(request: Request, jobs: list[Job], worker: EngineWorker) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for job in jobs:
                worker.cancel(job)
            return


def _check_key(given: str, key: str | None, admin: bool) -> None:
    if key is None:
        if admin:
            raise ApiError(403, "admin endpoints need a key: start the server with --api-key (or LORAFORGE_API_KEY)",
                           "permission_error", "admin_disabled")
        return
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_request_error",
                       "invalid_api_key")



class Guard:
    """ASGI middleware in front of every route: the API key, the body-size cap (413, read before any parsing; a
    body without Content-Length is buffered up to the cap), and the count of responses by status for /metrics."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, counts: dict[int, int]):
        self.app, self.api_key, self.cap, self.counts = app, api_key, max_body_bytes, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                self.counts[message["status"]] = self.counts.get(message["status"], 0) + 1
            await send(message)

        headers = dict(scope["headers"])
        try:
            path, cap = scope["path"], self.cap
            if path.startswith(("/v1/", "/admin/", "/metrics")):
                _check_key(headers.get(b"authorization", b"").decode("latin-1"), self.api_key,
                           admin=path.startswith("/admin/"))
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > cap):
                raise _too_large(cap)
            if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
                receive = await _buffered(receive, cap)
        except ApiError as e:
            return await JSONResponse(e.body, e.status, headers=e.headers)(scope, receive, counted)
        await self.app(scope, receive, counted)


def _too_large(cap: int) -> ApiError:
    return ApiError(413, f"the request body is over this server's cap of {cap} bytes", code="request_too_large")


async def _buffered(receive, cap: int):
    """Read a body sent without Content-Length, up to `cap` bytes (413 beyond); a receive that replays it."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > cap:
            raise _too_large(cap)
        more = message.get("more_body", False)
    replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

    async def replayed():
        return replay.pop() if replay else await receive()
    return replayed
