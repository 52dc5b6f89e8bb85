"""The FastAPI application: routes, OpenAI-format errors, authentication and size limits.

    GET  /health                      200 while the engine thread runs (no API key needed)
    GET  /metrics                     Prometheus text format
    GET  /v1/models, /v1/models/{id}  the base model and each adapter (adapters name the base as `parent`)
    POST /v1/completions              legacy completions (text or token prompts, batches, echo, logprobs)
    POST /v1/chat/completions         chat (the checkpoint's chat template)
    POST /v1/load_lora_adapter        {"lora_name", "lora_path"}  (only with --enable_lora_loading)
    POST /v1/unload_lora_adapter      {"lora_name"}                (only with --enable_lora_loading)

Every error is `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from infinilora_jax.errors import AdapterNotFoundError, InfiniLoraError
from infinilora_jax.lora.adapter_cache import check_adapter_name
from infinilora_jax.serving.chat import ChatTemplate
from infinilora_jax.serving.metrics import ServerMetrics
from infinilora_jax.serving.openai_serving import OpenAIServing
from infinilora_jax.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
    api_error,
)
from infinilora_jax.serving.security import SecurityMiddleware, resolve_adapter_dir
from infinilora_jax.serving.tokens import TokenFormatter
from infinilora_jax.serving.worker import EngineStepError, EngineWorker

log = logging.getLogger(__name__)

ERROR_RESPONSES = {s: {"description": d} for s, d in [
    (400, "invalid request"), (401, "missing or invalid API key"), (404, "unknown model or adapter"),
    (413, "request body too large"), (500, "engine failure"), (503, "no capacity")]}


@dataclasses.dataclass
class ServerConfig:
    """What an operator decides about the HTTP side (the engine's settings live in the LLM)."""

    model_name: str
    api_key: str | None = None  # bearer key required on every endpoint but /health
    enable_lora_loading: bool = False  # /v1/load_lora_adapter and /v1/unload_lora_adapter
    adapter_roots: tuple[str, ...] = ()  # the only directories runtime adapters are read from
    max_request_bytes: int = 8 << 20


class ServerState:
    """One server instance: the LLM, its engine thread, metrics, tokenizer and chat template."""

    def __init__(self, llm, config: ServerConfig, worker: EngineWorker | None = None,
                 metrics: ServerMetrics | None = None):
        if llm.tokenizer is None:
            raise ValueError(f"{llm.model_dir} has no tokenizer.json: the server needs one")
        if config.enable_lora_loading and not config.adapter_roots:
            raise ValueError("enable_lora_loading needs at least one adapter root (--adapter_root)")
        self.llm, self.config = llm, config
        self.model_name = config.model_name
        self.metrics = metrics or ServerMetrics(llm)
        self.worker = worker or EngineWorker(llm, self.metrics).start()
        self.tokenizer = llm.tokenizer
        self.formatter = TokenFormatter(llm.tokenizer)
        self.chat_template = ChatTemplate.from_model_dir(llm.model_dir)
        self.created = int(time.time())
        self._adapter_created: dict[str, int] = {}

    @property
    def adapters(self):
        return self.llm.runner.adapters

    def resolve_model(self, name: str | None) -> str | None:
        """The adapter a request's `model` names (None for the base model); 404 for anything else."""
        if name is None or name == self.model_name:
            return None
        if name in self.adapters.names():
            return name
        raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    def model_card(self, name: str) -> dict:
        if name == self.model_name:
            return {"id": name, "object": "model", "created": self.created, "owned_by": "infinilora-jax",
                    "root": self.llm.model_dir, "parent": None, "max_model_len": self.llm.max_model_len,
                    "permission": []}
        return {"id": name, "object": "model", "created": self._adapter_created.get(name, self.created),
                "owned_by": "infinilora-jax", "root": self.adapters.path(name), "parent": self.model_name,
                "max_model_len": self.llm.max_model_len, "permission": []}

    async def load_adapter(self, body: LoadLoraAdapterRequest) -> str:
        self._check_loading()
        name = body.lora_name
        try:
            check_adapter_name(name)
        except Exception as e:
            raise APIError(400, str(e), param="lora_name", code="invalid_adapter_name") from e
        if name == self.model_name or name in self.adapters.names():
            raise APIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name",
                           code="adapter_exists")
        path = resolve_adapter_dir(body.lora_path, list(self.config.adapter_roots), self.adapters.max_adapter_bytes)
        await asyncio.to_thread(self.adapters.register, name, path)  # read, validate, convert: off the loop
        self._adapter_created[name] = int(time.time())
        log.info("loaded adapter %s from %s", name, path)
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload_adapter(self, body: UnloadLoraAdapterRequest) -> str:
        self._check_loading()
        name = body.lora_name
        await self.worker.call(lambda: self.llm.engine.unload_adapter(name))  # between steps, on the engine thread
        self._adapter_created.pop(name, None)
        log.info("unloaded adapter %s", name)
        return f"Success: LoRA adapter '{name}' removed successfully."

    def _check_loading(self) -> None:
        if not self.config.enable_lora_loading:
            raise APIError(403, "runtime adapter loading is disabled on this server (start it with "
                                "--enable_lora_loading and --adapter_root)", code="lora_loading_disabled")


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="InfiniLoRA-JAX OpenAI-compatible server", version="0.1.0", responses=ERROR_RESPONSES)
    serving = OpenAIServing(state)
    app.state.server = state

    def error_response(error: APIError, headers: dict | None = None) -> JSONResponse:
        state.metrics.http_errors.labels(str(error.status)).inc()
        if error.status >= 500:
            log.error("%d: %s", error.status, error.message)
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, where, loc = f"malformed JSON body: {first.get('ctx', {}).get('error', '')}".strip(), "", []
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        return error_response(APIError(400, f"{where + ': ' if where else ''}{message}{more}",
                                       param=loc[0] if loc else None))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return error_response(APIError(exc.status_code, str(exc.detail)), getattr(exc, "headers", None))

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(InfiniLoraError)
    @app.exception_handler(EngineStepError)
    async def on_library_error(request: Request, exc: Exception):
        return error_response(api_error(exc))

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception):
        error = api_error(exc)
        if error.status >= 500:
            log.exception("unhandled error", exc_info=exc)
        return error_response(error)

    @app.get("/health")
    async def health():
        if not state.worker.alive:
            raise APIError(503, "the engine thread is not running")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models():
        cards = [state.model_card(state.model_name)]
        for name in state.adapters.names():
            try:
                cards.append(state.model_card(name))
            except AdapterNotFoundError:  # unloaded meanwhile
                pass
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str):
        state.resolve_model(model)
        return state.model_card(model)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await serving.chat(body, request)

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses={403: {"description": "off"}})
    async def load_lora_adapter(body: LoadLoraAdapterRequest):
        return await state.load_adapter(body)

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse,
              responses={403: {"description": "off"}, 409: {"description": "adapter in use"}})
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest):
        return await state.unload_adapter(body)

    app.add_middleware(SecurityMiddleware, api_key=state.config.api_key,
                       max_body_bytes=state.config.max_request_bytes,
                       on_error=lambda status: state.metrics.http_errors.labels(str(status)).inc())
    return app
