"""What a client may not do: read adapters from outside the operator's directories, skip the API key, or send
more bytes than allowed.

Adapter paths: `/v1/load_lora_adapter` is off unless the operator enables it, and then reads only from the
`--adapter_root` directories. A requested path (absolute, or relative to the first root) is refused if it has a
`..` component, a NUL byte, or if its real path (every symlink resolved) is not inside a root's real path; the
adapter's files are checked the same way (a symlinked `adapter_model.safetensors` pointing outside is refused) and
must be regular files (a FIFO or device would block or never end), within the size limit. The loader then reads
the resolved paths. (A local user who can rewrite the root's symlinks between this check and the read could still
race it; the roots are the operator's directories, so their permissions must keep clients out.)
"""

from __future__ import annotations

import hmac
import json
import os
import stat

from fastapi import HTTPException

from infinilora_jax.loading.peft_adapter import CONFIG_FILE, WEIGHTS_FILE
from infinilora_jax.serving.protocol import APIError

MAX_ADAPTER_CONFIG_BYTES = 1 << 20


def resolve_adapter_dir(path: str, roots: list[str], max_adapter_bytes: int | None) -> str:
    """The real path of an adapter directory the operator allows, after every check; APIError otherwise."""
    if not roots:
        raise APIError(403, "no adapter root is configured: the server loads no adapters at runtime",
                       param="lora_path")
    if "\x00" in path:
        raise APIError(400, "lora_path contains a NUL byte", param="lora_path")
    parts = path.replace("\\", "/").split("/")
    if ".." in parts:
        raise APIError(403, "lora_path may not contain '..' components", param="lora_path")
    real_roots = [os.path.realpath(r) for r in roots]
    candidate = path if os.path.isabs(path) else os.path.join(real_roots[0], path)
    real = os.path.realpath(candidate)
    if not any(_inside(real, root) for root in real_roots):
        raise APIError(403, f"lora_path {path!r} is outside the allowed adapter directories", param="lora_path")
    if not os.path.isdir(real):
        raise APIError(404, f"adapter directory {path!r} does not exist", param="lora_path",
                       code="adapter_not_found")
    for name, limit in ((CONFIG_FILE, MAX_ADAPTER_CONFIG_BYTES), (WEIGHTS_FILE, max_adapter_bytes)):
        file = os.path.join(real, name)
        if not os.path.lexists(file):
            raise APIError(400, f"{path!r} has no {name}: not a PEFT adapter directory", param="lora_path",
                           code="invalid_adapter")
        real_file = os.path.realpath(file)
        if not any(_inside(real_file, root) for root in real_roots):
            raise APIError(403, f"{name} of {path!r} links outside the allowed adapter directories",
                           param="lora_path")
        try:
            st = os.stat(real_file)
        except OSError as e:
            raise APIError(400, f"cannot read {name} of {path!r}: {e.strerror}", param="lora_path") from e
        if not stat.S_ISREG(st.st_mode):
            raise APIError(400, f"{name} of {path!r} is not a regular file", param="lora_path",
                           code="invalid_adapter")
        if limit is not None and st.st_size > limit:
            raise APIError(413, f"{name} of {path!r} is {st.st_size} bytes, over the limit of {limit}",
                           param="lora_path", code="adapter_too_large")
    return real


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def authorized(header: str | None, api_key: str) -> bool:
    """A constant-time check of an `Authorization: Bearer <key>` header."""
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class SecurityMiddleware:
    """Pure ASGI middleware: the API key on every path but the open ones, and a cap on request body bytes
    (by Content-Length up front, and by counting what actually arrives)."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, open_paths: tuple[str, ...] = ("/health",),
                 on_error=None):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes
        self.open_paths = open_paths
        self.on_error = on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope.get("path") not in self.open_paths:
            if not authorized(headers.get("authorization"), self.api_key):
                return await self._reject(send, APIError(401, "missing or invalid API key (send 'Authorization: "
                                                              "Bearer <key>')", code="invalid_api_key"),
                                          {"www-authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return await self._reject(send, APIError(400, "invalid Content-Length header"))
            if int(length) > self.max_body_bytes:
                return await self._reject(send, _too_large(self.max_body_bytes))
        received = 0
        started = False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge(self.max_body_bytes)
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await self._reject(send, _too_large(self.max_body_bytes))

    async def _reject(self, send, error: APIError, extra_headers: dict[str, str] | None = None):
        if self.on_error is not None:
            self.on_error(error.status)
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.encode(), v.encode()) for k, v in (extra_headers or {}).items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(HTTPException):
    """Raised while the body is read; an HTTPException so FastAPI's body parsing lets it through as a 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over the limit of {limit} bytes")


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body over the limit of {limit} bytes", code="request_too_large")
