"""Putting a server together: the LLM (engine settings), the server state (HTTP settings), uvicorn.

    state = ServerState(LLM(...), ServerConfig(model_name="tiny"))
    run(state, host="127.0.0.1", port=8000)                     # blocks (the `serve` binary)
    with BackgroundServer(state) as srv: print(srv.base_url)    # in a thread (tests, notebooks)
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import uvicorn

from infinilora_jax.llm import BUNDLED_DIR, LLM, bundled_adapters
from infinilora_jax.serving.app import ServerConfig, ServerState, build_app

log = logging.getLogger(__name__)

BUNDLED_NAME = os.path.basename(BUNDLED_DIR)


def default_model_name(model: str | None) -> str:
    """What `/v1/models` calls the base model: the `--model` argument as given (as vLLM does), or the bundled
    model's name."""
    return BUNDLED_NAME if model is None else model


def build_llm(model: str | None = None, adapters: dict[str, str] | None = None, **llm_kwargs) -> LLM:
    """The LLM to serve; with no model, the bundled tiny model with its adapters (unless adapters are given)."""
    if adapters is None:
        adapters = bundled_adapters() if model is None else {}
    return LLM(model, adapters=adapters, **llm_kwargs)


def run(state: ServerState, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted, then stop the engine thread."""
    app = build_app(state)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        state.worker.stop()


class BackgroundServer:
    """uvicorn on a loopback port in a daemon thread (port 0: any free port)."""

    def __init__(self, state: ServerState, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.state = state
        self.app = build_app(state)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        config = uvicorn.Config(self.app, log_level=log_level, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True,
                                        name="uvicorn")

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def stop(self, stop_engine: bool = False) -> None:
        self.server.should_exit = True
        self._thread.join(10)
        self._sock.close()
        if stop_engine:
            self.state.worker.stop()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["BackgroundServer", "ServerConfig", "ServerState", "build_app", "build_llm", "default_model_name", "run"]
