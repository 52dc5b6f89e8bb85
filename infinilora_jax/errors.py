"""Typed errors users can act on. Each names the file or field at fault."""

from __future__ import annotations


class InfiniLoraError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(InfiniLoraError, ValueError):
    """A model or deployment config is invalid or asks for something unsupported."""


class CheckpointError(InfiniLoraError, ValueError):
    """A base-model checkpoint is missing, malformed or does not match its config."""


class AdapterError(InfiniLoraError, ValueError):
    """A LoRA adapter cannot be loaded. `path` and `field` say where."""

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None):
        self.path = path
        self.field = field
        where = [f"path={path}"] if path else []
        where += [f"field={field}"] if field else []
        super().__init__(f"{message} ({', '.join(where)})" if where else message)


class AdapterLoadError(AdapterError):
    """A registered adapter could not be read again when a request needed it (its files changed or vanished
    after registration). The request fails with it; nothing else does."""


class UnsupportedAdapterError(AdapterError):
    """The adapter uses a PEFT feature this server does not implement (DoRA, modules_to_save, ...)."""


class AdapterNotFoundError(InfiniLoraError, KeyError):
    """A request named an adapter that is not registered."""

    def __str__(self) -> str:  # KeyError would quote its message.
        return str(self.args[0]) if self.args else "adapter not found"


class LayoutError(InfiniLoraError, ValueError):
    """A mesh layout does not fit the model or the available devices."""


class RequestError(InfiniLoraError, ValueError):
    """A generation request is invalid (empty prompt, prompt over the context limit, bad sampling params)."""


class CapacityError(RequestError):
    """The request is valid but the KV cache or the adapter slots have no room for it right now: retry later."""
