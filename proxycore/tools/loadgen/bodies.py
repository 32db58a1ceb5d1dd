"""The bytes of each request: the built-in LLM bodies, body templates (``{n}``, ``{rand}``)
and :class:`RequestMaker` (a head validated once by h11, a body per request)."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from typing import Any, Final

from ..loadgen.llm import StreamFormat
from ..loadgen.spec import LoadSpec, build_request

__all__ = ["PROMPT", "RequestMaker", "llm_body", "llm_headers", "render"]

#: The prompt of the built-in bodies; ``{n}`` and ``{rand}`` make every request differ
#: (a prompt cache must not flatter the numbers).
PROMPT: Final = "Request {n} ({rand}): tell me a short story about a lighthouse keeper."
_TOKEN_VALUE: Final = re.compile(r"[\x21-\x7e]+")


def llm_body(fmt: StreamFormat, model: str, max_tokens: int) -> str:
    """The built-in body template of ``fmt`` (a chat request with ``stream`` on)."""
    messages = [{"role": "user", "content": PROMPT}]
    body: dict[str, object] = {"model": model, "max_tokens": max_tokens, "stream": True}
    if fmt == "openai":
        body["stream_options"] = {"include_usage": True}
    body["messages"] = messages
    return json.dumps(body)


def llm_headers(fmt: StreamFormat) -> tuple[tuple[str, str], ...]:
    """Headers the built-in body of ``fmt`` needs."""
    headers = [("Content-Type", "application/json"), ("Accept", "text/event-stream")]
    if fmt == "anthropic":
        headers.append(("anthropic-version", "2023-06-01"))
    return tuple(headers)


def render(template: str, n: int, rng: random.Random) -> bytes:
    """``template`` with ``{n}`` and ``{rand}`` replaced (plain replacement: JSON braces
    are left alone), UTF-8."""
    text = template.replace("{n}", str(n))
    if "{rand}" in text:
        text = text.replace("{rand}", f"{rng.getrandbits(64):016x}")
    return text.encode("utf-8")


class RequestMaker:
    """Builds the request bytes: the head (validated by h11 once) plus a body per request.

    ``static`` holds the whole request when every request is the same (no template).
    """

    def __init__(self, spec: LoadSpec) -> None:
        self.static: bytes | None = None
        self.template = spec.body_template
        self.rng = random.Random()
        if spec.body_template is None and spec.mcp_method is None:
            self.static = build_request(spec)
            self.prefix = b""
            return
        # The head with a placeholder Content-Length as its last field: cut it off.
        headers = tuple(h for h in spec.headers if h[0].lower() != "content-length")
        fields = _fields(spec) | {"headers": headers, "body": b"-", "body_template": None}
        wire = build_request(LoadSpec(**(fields | {"mcp_method": None, "mcp_params": None})))
        head = wire[: wire.index(b"\r\n\r\n") + 2]
        start = head.lower().rindex(b"\r\ncontent-length: 1\r\n") + 2
        end = head.index(b"\r\n", start) + 2
        self.prefix = head[:start] + head[end:]

    def request(self, n: int, extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
        """Request number ``n`` (from 1): its body from the template."""
        if self.static is not None:
            return self.static
        assert self.template is not None
        return self.with_body(render(self.template, n, self.rng), extra)

    def with_body(self, body: bytes, extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
        """The head plus ``extra`` fields, then ``body`` (MCP: each call's own JSON)."""
        parts = [self.prefix]
        for name, value in extra:
            if not _TOKEN_VALUE.fullmatch(value.decode("latin-1")):
                raise ValueError("a header value to send is not visible ASCII")
            parts.append(b"%s: %s\r\n" % (name, value))
        parts.append(b"Content-Length: %d\r\n\r\n" % len(body))
        parts.append(body)
        return b"".join(parts)


def _fields(spec: LoadSpec) -> dict[str, Any]:
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
