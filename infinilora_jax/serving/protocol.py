"""The OpenAI-compatible request bodies (pydantic, so FastAPI validates them and publishes them in its OpenAPI
schema) and the OpenAI error format.

Fields follow OpenAI's API and vLLM's extensions (`top_k`, `ignore_eos`, `stop_token_ids`,
`return_tokens_as_token_ids`, `add_generation_prompt`). Unknown fields are ignored, as OpenAI does; fields this
server cannot honour (penalties, logit_bias, suffix, tools, ...) are rejected with a 400 when set to anything but
their neutral value, never silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from infinilora_jax.errors import (
    AdapterError,
    AdapterLoadError,
    AdapterNotFoundError,
    CapacityError,
    ConfigError,
    InfiniLoraError,
    RequestError,
)
from infinilora_jax.lora.adapter_cache import AdapterBusyError
from infinilora_jax.sampling import MAX_LOGPROBS

MAX_N = 64  # choices per prompt
MAX_PROMPTS = 1024  # prompts in one completions request
MAX_CHOICES = 1024  # prompts x n
MAX_STOP = 16  # stop strings
MAX_STOP_LEN = 256  # characters per stop string
SEED_RANGE = dict(ge=-(2**63), lt=2**64)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
               413: "request_too_large", 500: "internal_server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error to answer with `{"error": {"message", "type", "param", "code"}}` and an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | int | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code if code is not None else status
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_error(e: Exception) -> APIError:
    """The API error for an exception raised by the library (a typed error users can act on) or a bug (500)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, AdapterNotFoundError):
        return APIError(404, str(e), param="model", code="model_not_found")
    if isinstance(e, AdapterBusyError):
        return APIError(409, str(e), param="lora_name", code="adapter_busy")
    if isinstance(e, CapacityError):
        return APIError(503, str(e), code="capacity")
    if isinstance(e, AdapterLoadError):  # registered, but its files changed or vanished: the server's fault
        return APIError(500, str(e), param="model", code="adapter_load_failed")
    if isinstance(e, AdapterError):
        return APIError(400, str(e), param=getattr(e, "field", None), code="invalid_adapter")
    if isinstance(e, (RequestError, ConfigError)):
        return APIError(400, str(e))
    if isinstance(e, InfiniLoraError):
        return APIError(400, str(e))
    return APIError(500, f"internal error: {type(e).__name__}: {e}")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


Probability = Annotated[float, Field(ge=0.0, le=1.0)]


def _ONLY(value) -> dict:  # noqa: N802 - reads as a constant in field declarations
    """A published-schema constraint: the field accepts only `value`."""
    return {"minimum": value, "maximum": value}

Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _SamplingBody(_Body):
    model: str | None = Field(None, max_length=256, description="the base model's name or an adapter's name; "
                              "omitted: the base model")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0: greedy; default 1")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=1 << 30, description="vLLM extension; -1 or 0: off")
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_LEN)]] | None = Field(
        None, max_length=MAX_STOP)
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=2**31)]] | None = Field(None, max_length=256)
    seed: int | None = Field(None, **SEED_RANGE)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    return_tokens_as_token_ids: bool = Field(False, description="vLLM extension: logprob tokens as 'token_id:N'")
    # Not supported: accepted only at their neutral value (the published schema says so; other values get a 400
    # that names the field, not a silent ignore).
    presence_penalty: Penalty = Field(0.0, description="not supported: must be 0", json_schema_extra=_ONLY(0))
    frequency_penalty: Penalty = Field(0.0, description="not supported: must be 0", json_schema_extra=_ONLY(0))
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0, description="not supported: must be 1",
                                      json_schema_extra=_ONLY(1))
    min_p: Probability = Field(0.0, description="not supported: must be 0", json_schema_extra=_ONLY(0))
    logit_bias: dict[str, float] | None = Field(None, description="not supported: must be empty",
                                                json_schema_extra={"maxProperties": 0})
    user: str | None = Field(None, max_length=256)

    def check_supported(self) -> None:
        neutral = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "min_p": 0.0}
        for field, value in neutral.items():
            if getattr(self, field) != value:
                raise APIError(400, f"{field}={getattr(self, field)} is not supported by this server "
                                    f"(only {value})", param=field)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


TokenIds = list[Annotated[int, Field(ge=-(2**63), lt=2**63)]]


class CompletionRequest(_SamplingBody):
    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(
        ..., description="text, a batch of texts, token ids, or a batch of token id lists")
    max_tokens: int | None = Field(16, ge=0, description="0 only with echo (prompt logprobs only)")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = Field(None, description="not supported", json_schema_extra={"maxLength": 0})
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="only best_of == n is supported")

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, f"best_of={self.best_of} != n={self.n} is not supported", param="best_of")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str = Field(..., min_length=1, max_length=64)
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content


class ChatCompletionRequest(_SamplingBody):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=4096)
    max_tokens: int | None = Field(None, ge=1, description="deprecated alias of max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="default: the rest of the context")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    tools: list[Any] | None = Field(None, description="not supported")
    tool_choice: Any = Field(None, description="not supported")
    functions: list[Any] | None = Field(None, description="not supported")
    response_format: dict[str, Any] | None = Field(None, description="only {'type': 'text'}")

    def check_supported(self) -> None:
        super().check_supported()
        for field in ("tools", "functions"):
            if getattr(self, field):
                raise APIError(400, f"{field} (tool calling) is not supported by this server", param=field)
        if self.tool_choice not in (None, "none"):
            raise APIError(400, "tool_choice is not supported by this server", param="tool_choice")
        if self.response_format not in (None, {"type": "text"}):
            raise APIError(400, "response_format other than text is not supported", param="response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")


class LoadLoraAdapterRequest(_Body):
    lora_name: str = Field(..., min_length=1, max_length=128)
    lora_path: str = Field(..., min_length=1, max_length=4096)


class UnloadLoraAdapterRequest(_Body):
    lora_name: str = Field(..., min_length=1, max_length=128)
    lora_int_id: int | None = Field(None, description="ignored (vLLM compatibility)")
