"""The checkpoint's chat template (tokenizer_config.json `chat_template`, or a `chat_template.jinja` file),
rendered with a sandboxed, immutable Jinja2 environment: a template cannot reach Python internals or mutate the
messages, and client text is data, never template code."""

from __future__ import annotations

import datetime
import json
import logging
import os

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from infinilora_jax.serving.protocol import APIError

log = logging.getLogger(__name__)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    @staticmethod
    def from_model_dir(model_dir: str) -> ChatTemplate | None:
        """The template a checkpoint ships, or None."""
        source, cfg = None, {}
        path = os.path.join(model_dir, "tokenizer_config.json")
        if os.path.isfile(path):
            with open(path) as f:
                cfg = json.load(f)
            source = cfg.get("chat_template")
            if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
                named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
                source = named.get("default") or next(iter(named.values()), None)
        jinja_file = os.path.join(model_dir, "chat_template.jinja")
        if source is None and os.path.isfile(jinja_file):
            with open(jinja_file) as f:
                source = f.read()
        if not isinstance(source, str) or not source:
            return None
        return ChatTemplate(source, _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token")))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.TemplateError as e:  # includes SecurityError and raise_exception(...) from the template
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise APIError(400, f"the chat template could not render the messages: {e}", param="messages") from e


def _raise(message: str):
    raise jinja2.TemplateError(message)


def _token_text(token) -> str:
    if isinstance(token, dict):
        return str(token.get("content") or "")
    return token or ""
