"""The FastAPI app: OpenAI-compatible endpoints in front of an engine, with auth, limits, metrics and routing.

    GET  /health                 liveness + what is served
    GET  /metrics                Prometheus text format
    GET  /v1/models
    POST /v1/chat/completions    (stream, response_format json_schema / json_object, logprobs, retrieval)
    POST /v1/completions         (retrieval only when the body asks: "retrieval": true)

Retrieval (serve.retrieval, slmforge/serve/retrieval.py): the last user message is searched in the run's index and
rewritten as `retrieval_prompt(question, hits)` before the specialist, or the fallback, sees it; the response carries
`citations` (streamed: in the chunk holding finish_reason) and `slmforge.retrieval` {k, passages, ms}. A body field
"retrieval": false turns it off for that request. Plain completions are raw prompts a client wrote (often a few-shot
or a format of its own), so passages go before them only when asked.
"""

from __future__ import annotations

import hmac
import json
import os
import time
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from slmforge.artifacts import EXPORTED_MODEL, GGUF, gguf_file
from slmforge.recipe import Recipe, ServeConfig
from slmforge.lm.http import OpenAILM
from slmforge.serve.metrics import Metrics
from slmforge.serve.protocol import (
    APIError, ChatRequest, CompletionRequest, GenRequest, Generation, chat_chunk, chat_response, completion_chunk,
    completion_response, new_id, parse, sse,
)
from slmforge.serve.retrieval import Retrieval, Retrieved, open_retrieval
from slmforge.serve.router import Router


class BodyLimit:
    """Pure ASGI middleware: 413 for bodies over the limit, by Content-Length or while reading a chunked body."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(send)
        chunks, size, more = [], 0, True
        while more:  # read (and bound) the whole body before the app sees it
            message = await receive()
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._reject(send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _reject(self, send):
        err = APIError(413, f"request body larger than {self.max_bytes} bytes (serve.max_request_bytes)", code="request_too_large")
        payload = json.dumps(err.body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def _gen_request(body: ChatRequest | CompletionRequest, cfg: ServeConfig) -> GenRequest:
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or cfg.default_max_tokens
    if max_tokens > cfg.max_tokens:
        raise APIError(400, f"max_tokens {max_tokens} is over this server's limit of {cfg.max_tokens}", "max_tokens")
    req = GenRequest(max_tokens=max_tokens, temperature=cfg.temperature if body.temperature is None else body.temperature,
                     top_p=1.0 if body.top_p is None else body.top_p, stop=body.stop or [], seed=body.seed, model=body.model)
    if isinstance(body, ChatRequest):
        req.messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        rf = body.response_format
        if rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or not rf.json_schema.schema_:
                raise APIError(400, "response_format.json_schema.schema is required for type json_schema", "response_format")
            req.schema = rf.json_schema.schema_
        elif rf is not None and rf.type == "json_object":
            req.schema = {"type": "object"}
        if req.schema is not None:
            import jsonschema

            try:
                jsonschema.validators.validator_for(req.schema).check_schema(req.schema)
            except jsonschema.SchemaError as err:
                raise APIError(400, f"response_format: not a valid JSON schema: {err.message}", "response_format") from None
    else:
        req.prompt = body.prompt
    return req


def create_app(specialist, cfg: ServeConfig, *, fallback=None, model_name: str | None = None, api_key: str | None = None,
               retrieval: Retrieval | None = None) -> FastAPI:
    """An app serving `specialist` (any slmforge.lm backend), falling back to `fallback` (an OpenAILM or None), with the
    passages of `retrieval` (None: no retrieval) in each chat request."""
    name = model_name or specialist.name
    metrics = Metrics()
    router = Router(specialist, fallback, cfg.routing, metrics, name)
    app = FastAPI(title=f"slmforge: {name}", docs_url=None, redoc_url=None)
    app.state.metrics, app.state.router, app.state.retrieval = metrics, router, retrieval

    def retrieve(body, req: GenRequest, kind: str) -> Retrieved | None:
        """Search and rewrite the request in place, before any model sees it (so the fallback gets the same passages)."""
        asked = body.retrieval
        if asked is None:
            asked = kind == "chat" and retrieval is not None
        if not asked:
            return None
        if retrieval is None:
            raise APIError(400, "retrieval: this server has no retrieval index (serve.retrieval is off, or the run "
                           "has no index stage)", "retrieval")
        got = retrieval.apply(req, kind, fits)
        if got is not None:
            metrics.observe_retrieval(got.ms / 1000, len(got.hits))
        return got

    def fits(req: GenRequest) -> bool:
        """Whether prompt + max_tokens fit the specialist's context (in-process engines; a remote one decides itself)."""
        limit = getattr(specialist, "max_context", None)
        if not limit:
            return True
        text = "".join(m["content"] for m in req.messages) if req.messages is not None else (req.prompt or "")
        if len(text.encode()) + 256 + req.max_tokens <= limit:
            return True  # no tokenizing needed: a token holds at least one byte; 256 for the chat template's own
            #              tokens (a template longer than that still gets the engine's own 400 context_length_exceeded)
        try:
            return len(specialist.tokenize(req)) + req.max_tokens <= limit
        except (NotImplementedError, APIError):
            return True

    def with_retrieval(payload: dict, got: Retrieved | None) -> dict:
        if got is not None:
            payload["citations"] = got.citations()
            payload["slmforge"] = {**payload.get("slmforge", {}), "retrieval": got.info(retrieval.k)}
        return payload

    app.add_middleware(BodyLimit, max_bytes=cfg.max_request_bytes)

    def check_auth(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not given or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")

    def error_response(err: APIError) -> JSONResponse:
        headers = {"retry-after": str(int(err.retry_after))} if err.retry_after is not None else None  # 503 queue full
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return error_response(err)

    @app.middleware("http")
    async def _key_on_every_route(request: Request, call_next):
        """With a key set, every route needs it (/metrics, /openapi.json, /v1/*, unknown paths) except /health."""
        if api_key and request.url.path != "/health":
            try:
                check_auth(request)
            except APIError as err:
                return JSONResponse(err.body(), status_code=err.status)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}  # liveness only: no model names, backends or URLs to anyone without the key

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        started = time.perf_counter()
        status = 200
        try:
            check_auth(request)
            listed = [name] + ([router.fallback_name] if router.fallback_name else [])
            return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "slmforge"} for n in listed]}
        except APIError as err:
            status = err.status
            raise
        finally:
            metrics.observe_request("models", status, time.perf_counter() - started)

    async def handle(request: Request, kind: str):
        started = time.perf_counter()
        status, streaming = 200, False
        try:
            check_auth(request)
            body = parse(ChatRequest if kind == "chat" else CompletionRequest, await request.body())
            req = _gen_request(body, cfg)
            got = retrieve(body, req, kind)
            want_lp = bool(body.logprobs) if kind == "chat" else body.logprobs is not None
            if body.stream:
                await specialist.validate(req)  # a 4xx must come before the 200 of a stream
                streaming = True
                include_usage = bool((body.stream_options or {}).get("include_usage"))
                return StreamingResponse(stream_events(req, kind, include_usage, started, got), media_type="text/event-stream",
                                         headers={"cache-control": "no-cache"})
            routed = await router.complete(req)
            build = chat_response if kind == "chat" else completion_response
            return JSONResponse(with_retrieval(build(routed.generation, routed.route, want_lp), got),
                                headers={"x-slmforge-answered-by": routed.route["answered_by"], "x-slmforge-route": routed.route["route"]})
        except APIError as err:
            status = err.status
            return error_response(err)
        finally:
            if not streaming:
                metrics.observe_request(kind, status, time.perf_counter() - started)

    async def stream_events(req: GenRequest, kind: str, include_usage: bool, started: float, got: Retrieved | None):
        cid = new_id("chatcmpl" if kind == "chat" else "cmpl")
        chunk = (lambda text, finish=None, **kw: chat_chunk(cid, name, {"content": text} if text is not None else {}, finish, **kw)) \
            if kind == "chat" else (lambda text, finish=None, **kw: completion_chunk(cid, name, text or "", finish, **kw))
        status = 200
        try:
            if kind == "chat":
                yield sse(chat_chunk(cid, name, {"role": "assistant", "content": ""}))
            if fallback is None:  # true token streaming: nothing can redirect the answer
                final: Generation | None = None
                async for item in specialist.stream(req):
                    if isinstance(item, str):
                        yield sse(chunk(item))
                    else:
                        final = replace(item, model=name)
                route = router.account_streamed(final, req)
            else:  # the router must see the specialist's whole answer before choosing; a fallback answer streams live
                async for item in router.stream(req):
                    if isinstance(item, str):
                        yield sse(chunk(item))
                    else:
                        final, route = item.generation, item.route
            extra = with_retrieval({"slmforge": route}, got)  # the citations ride on the chunk with finish_reason
            yield sse(chunk(None, final.finish_reason, **extra))
            if include_usage:
                yield sse({"id": cid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                           "created": int(time.time()), "model": final.model, "choices": [],
                           "usage": {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens,
                                     "total_tokens": final.prompt_tokens + final.completion_tokens}})
        except APIError as err:
            status = err.status
            yield sse(err.body())
        finally:
            metrics.observe_request(kind, status, time.perf_counter() - started)
        yield sse("[DONE]")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "completion")

    return app


# ------------------------------------------------------------------------------------------ from a recipe
def describe(engine) -> str:
    return engine.describe()


def serving_model(recipe: Recipe) -> str:
    """serve.model 'auto': this run's exported model, else its merged model (slmforge/merge), else its last trained model,
    else the base model."""
    spec = recipe.serve.model
    if spec != "auto":
        return spec
    from slmforge.run import RunDir

    run = RunDir(recipe.run_path)
    exported = run.path(EXPORTED_MODEL)
    if run.has(EXPORTED_MODEL) and (exported / "config.json").is_file():
        return str(exported)
    from slmforge.merge import merged_model

    merged = merged_model(run)
    if merged is not None:
        return str(merged)
    trained = run.trained_models()
    return str(list(trained.values())[-1]) if trained else recipe.base_model


GGUF_PREFERENCE = ("q8_0", "Q4_K_M", "f16", "bf16", "f32")  # near-lossless first; a 135M model loses more to 4 bits


def serving_gguf(recipe: Recipe, spec: str | None = None) -> Path | None:
    """The GGUF file holding the model `spec` (default: serving_model()) names, if there is one: that model is a .gguf
    (or the packaged default), or it is this run's export, whose gguf/ folder holds serve.gguf_type (else another
    exported type)."""
    from slmforge.models import DEFAULT_MODEL, default_gguf

    spec = spec or serving_model(recipe)
    if spec == DEFAULT_MODEL:
        return default_gguf()
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return path
    from slmforge.run import RunDir

    run = RunDir(recipe.run_path)
    if path.resolve() != run.path(EXPORTED_MODEL).resolve() or not run.has(GGUF):  # only this run's export has GGUF files
        return None
    order = [recipe.serve.gguf_type] + [t for t in GGUF_PREFERENCE if t != recipe.serve.gguf_type]
    folder = run.path(GGUF)
    return next((folder / gguf_file(recipe.name, t) for t in order if (folder / gguf_file(recipe.name, t)).is_file()), None)


def make_engine(recipe: Recipe, name: str):
    """The specialist's engine: a remote server (serve.backend_url), llama.cpp on a GGUF, or transformers."""
    import importlib.util

    cfg = recipe.serve
    if cfg.backend_url:
        return remote(cfg.backend_url, cfg.backend_model or name, _env(cfg.backend_api_key_env), cfg.timeout_s, name=name)
    spec = serving_model(recipe)
    gguf = serving_gguf(recipe, spec) if cfg.engine != "transformers" else None
    have_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    if cfg.engine == "llamacpp" and gguf is None:
        raise ServeError(f"serve.engine llamacpp: {spec} is not a GGUF file and no GGUF was exported "
                         "(set serve.model to a .gguf file, or export with export.gguf)")
    if cfg.engine == "llamacpp" and not have_llama_cpp:
        raise ServeError("serve.engine llamacpp: llama-cpp-python is not installed (pip install 'slmforge[llamacpp]')")
    if gguf is not None and have_llama_cpp:
        if not gguf.is_file():
            raise ServeError(f"serve.model: GGUF file not found: {gguf}")
        from slmforge.lm.llamacpp import LlamaCppLM

        return LlamaCppLM(gguf, name, n_ctx=cfg.context, max_queue=cfg.max_queue)
    from slmforge.lm.hf import TransformersLM

    device = None if cfg.device == "auto" else cfg.device
    return TransformersLM.load(spec, device=device, name=name, max_batch=cfg.max_batch, max_queue=cfg.max_queue)


def remote(base_url: str, model: str, api_key: str | None, timeout_s: float, name: str) -> OpenAILM:
    """A backend or fallback server: one quick retry on a transient failure (a client is waiting)."""
    return OpenAILM(base_url, model, api_key, timeout_s=timeout_s, max_retries=1, backoff_s=0.2, name=name)


class ServeError(RuntimeError):
    pass


def _env(var: str) -> str | None:
    return (os.environ.get(var) or None) if var else None


def build_app(recipe: Recipe) -> FastAPI:
    cfg = recipe.serve
    name = cfg.model_name or recipe.name
    try:
        retrieval = open_retrieval(recipe)  # before the model loads: a missing index is said at once
    except ValueError as err:
        raise ServeError(str(err)) from None
    specialist = make_engine(recipe, name)
    r = cfg.routing
    fallback = remote(r.fallback_url, r.fallback_model, _env(r.fallback_api_key_env), cfg.timeout_s,
                      name=r.fallback_model or r.fallback_url) if r.fallback_url else None
    return create_app(specialist, cfg, fallback=fallback, model_name=name, api_key=_env(cfg.api_key_env), retrieval=retrieval)


def serve(recipe: Recipe) -> None:
    import uvicorn

    from slmforge.console import console

    app = build_app(recipe)
    cfg = recipe.serve
    auth = "on" if _env(cfg.api_key_env) else f"off (set {cfg.api_key_env} to require a key)"
    console.print(f"serving [bold]{cfg.model_name or recipe.name}[/bold] ({describe(app.state.router.specialist)}) "
                  f"on http://{cfg.host}:{cfg.port}/v1 "
                  f"(auth {auth}; fallback {cfg.routing.fallback_url or 'none'}; retrieval {_retrieval_note(app)})", highlight=False)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")


def _retrieval_note(app: FastAPI) -> str:
    r = app.state.retrieval
    return f"top {r.k} of {r.size:,} passages, at most {r.max_words} words" if r is not None else "off"
