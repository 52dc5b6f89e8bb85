"""The OpenAI-compatible HTTP server (docs/architecture/05-server.md); the binary is `python -m
infinilora_jax.serve`."""

from infinilora_jax.serving.app import ServerConfig, ServerState, build_app
from infinilora_jax.serving.server import BackgroundServer, build_llm, default_model_name, run

__all__ = ["BackgroundServer", "ServerConfig", "ServerState", "build_app", "build_llm", "default_model_name", "run"]
