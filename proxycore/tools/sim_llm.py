"""The simulator's LLM chat formats: OpenAI ``/v1/chat/completions`` and Anthropic
``/v1/messages`` streams with real text, one word (a token) per delta, usage at the end.

Pure: builds the bytes; :mod:`proxycore.tools.sim` times and sends them.
"""

from __future__ import annotations

import json
import time
from typing import Final, Literal

__all__ = ["DEFAULT_MAX_TOKENS", "MAX_TOKENS", "TEXT", "ChatRequest", "ChatStream", "words"]

Format = Literal["openai", "anthropic"]

#: What the simulated model says (again from the start when it needs more words).
TEXT: Final = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. "
    "He polished the great lens until it shone like a second moon, wound the clockwork, "
    "and lit the lamp. Ships he would never meet passed safely in the dark, and he wrote "
    "their lights into a small blue notebook. One winter night a storm tore the shutters "
    "loose and the lamp went out. He carried a lantern to the gallery and swung it slowly "
    "until dawn, arms burning, singing old songs to stay awake. In the morning a fishing "
    "boat came into the harbour with all its crew, and the captain climbed the hill to "
    "shake his hand. The keeper only smiled, made two cups of tea, and asked about the sea."
)
_WORDS: Final = TEXT.split(" ")
DEFAULT_MAX_TOKENS: Final = 16
MAX_TOKENS: Final = 100_000


def words(n: int) -> list[str]:
    """``n`` tokens of :data:`TEXT`: a word each, every one but the first with its space."""
    return [(" " if i else "") + _WORDS[i % len(_WORDS)] for i in range(n)]


class ChatRequest:
    """What a chat request asks for: model, max tokens, stream, prompt size in tokens."""

    def __init__(self, body: bytes) -> None:
        """Raises ValueError (answered 400) for a body that is no usable chat request."""
        try:
            data = json.loads(body) if body.strip() else {}
        except ValueError:
            raise ValueError("the body is not JSON") from None
        if not isinstance(data, dict):
            raise ValueError("the body must be a JSON object")
        model = data.get("model", "sim")
        max_tokens = data.get("max_tokens", data.get("max_completion_tokens", DEFAULT_MAX_TOKENS))
        if not isinstance(model, str):
            raise ValueError("model must be a string")
        if not isinstance(max_tokens, int) or not 0 <= max_tokens <= MAX_TOKENS:
            raise ValueError(f"max_tokens must be an integer between 0 and {MAX_TOKENS}")
        self.model = model
        self.max_tokens: int = max_tokens
        self.stream = data.get("stream") is True
        self.prompt_tokens = max(1, len(json.dumps(data.get("messages", ""))) // 4)


def _sse(obj: object, event: str | None = None) -> bytes:
    line = b"data: " + json.dumps(obj, separators=(",", ":")).encode("utf-8") + b"\n\n"
    return b"event: " + event.encode("ascii") + b"\n" + line if event else line


class ChatStream:
    """The events of one streamed answer of ``tokens`` words."""

    def __init__(self, fmt: Format, request: ChatRequest, tokens: int, usage: bool) -> None:
        self.fmt = fmt
        self.request = request
        self.tokens = tokens
        self.usage = usage
        self.id = f"sim-{time.time_ns():x}"
        self.created = int(time.time())
        self.finish = "length" if tokens >= request.max_tokens else "stop"

    def _chunk(self, delta: dict[str, object], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return _sse(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.request.model,
                "choices": [choice],
            }
        )

    def start(self) -> bytes:
        """Sent at once, before the first token (role chunk / message_start...)."""
        if self.fmt == "openai":
            return self._chunk({"role": "assistant", "content": ""})
        message: dict[str, object] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.request.model,
            "content": [],
            "stop_reason": None,
            "usage": {"input_tokens": self.request.prompt_tokens, "output_tokens": 0},
        }
        start = {"type": "content_block_start", "index": 0}
        start["content_block"] = {"type": "text", "text": ""}
        return (
            _sse({"type": "message_start", "message": message}, "message_start")
            + _sse(start, "content_block_start")
            + _sse({"type": "ping"}, "ping")
        )

    def delta(self, text: str) -> bytes:
        if self.fmt == "openai":
            return self._chunk({"content": text})
        delta = {"type": "content_block_delta", "index": 0}
        delta["delta"] = {"type": "text_delta", "text": text}
        return _sse(delta, "content_block_delta")

    def end(self) -> bytes:
        """The finish, the usage (if on) and the terminator."""
        prompt, out = self.request.prompt_tokens, self.tokens
        if self.fmt == "openai":
            tail = self._chunk({}, "length" if self.finish == "length" else "stop")
            if self.usage:
                usage = {"prompt_tokens": prompt, "completion_tokens": out}
                usage["total_tokens"] = prompt + out
                tail += _sse(
                    {
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.request.model,
                        "choices": [],
                        "usage": usage,
                    }
                )
            return tail + b"data: [DONE]\n\n"
        stop = "max_tokens" if self.finish == "length" else "end_turn"
        message_delta: dict[str, object] = {"type": "message_delta"}
        message_delta["delta"] = {"stop_reason": stop, "stop_sequence": None}
        if self.usage:
            message_delta["usage"] = {"output_tokens": out}
        return (
            _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
            + _sse(message_delta, "message_delta")
            + _sse({"type": "message_stop"}, "message_stop")
        )

    def whole(self) -> dict[str, object]:
        """The non-streamed answer (``"stream": false``)."""
        text = "".join(words(self.tokens))
        prompt, out = self.request.prompt_tokens, self.tokens
        if self.fmt == "openai":
            message = {"role": "assistant", "content": text}
            return {
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.request.model,
                "choices": [{"index": 0, "message": message, "finish_reason": self.finish}],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": out,
                    "total_tokens": prompt + out,
                },
            }
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.request.model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "max_tokens" if self.finish == "length" else "end_turn",
            "usage": {"input_tokens": prompt, "output_tokens": out},
        }
