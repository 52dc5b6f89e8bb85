"""An implementation chosen when a function is traced: an explicit argument, else the innermost `use` block,
else an environment variable, else a default. jit caches keep what they traced, so a choice made after a
program's first trace does not reach that program: a jit traced inside a step for reuse across programs keys
its cache on `current()`, every choice's value now. `env_choice` reads a setting from the environment alone, for
choices made once when an object is built rather than at trace time."""

from __future__ import annotations

import contextlib
import contextvars
import os

from infinilora_jax.errors import ConfigError

_ALL: list[TraceTimeChoice] = []


class TraceTimeChoice:
    def __init__(self, what: str, env_var: str, names, default: str, use_name: str):
        self.what, self.env_var, self.names, self.default = what, env_var, tuple(names), default
        self.use_name = use_name  # what callers call `use`, for error messages
        self._var: contextvars.ContextVar[str | None] = contextvars.ContextVar(env_var, default=None)
        _ALL.append(self)

    def check(self, name: str) -> str:
        if name not in self.names:
            raise ConfigError(f"unknown {self.what} {name!r} (from {self.env_var} or {self.use_name}); "
                              f"valid: {', '.join(self.names)}")
        return name

    @contextlib.contextmanager
    def use(self, name: str):
        """Make traces inside the block choose `name`."""
        token = self._var.set(self.check(name))
        try:
            yield
        finally:
            self._var.reset(token)

    def selected(self, explicit: str | None = None) -> str:
        # names are lower case; the environment's value is taken in any case (INFINILORA_LORA_BACKEND=GPU)
        return self.check(explicit or self._var.get() or os.environ.get(self.env_var, "").lower() or self.default)


def env_choice(env_var: str, names, default: str) -> str:
    """$env_var (any case) if set, else `default`; ConfigError unless it is one of `names`."""
    name = os.environ.get(env_var, default).lower()
    if name not in names:
        raise ConfigError(f"{env_var}={name!r}: one of {', '.join(names)}")
    return name


def current() -> tuple[tuple[str, str], ...]:
    """(environment variable, selection) of every choice defined so far: what a trace made now would choose."""
    return tuple((c.env_var, c.selected()) for c in _ALL)


__all__ = ["TraceTimeChoice", "current", "env_choice"]
