"""The pure pieces of the tunnel's HTTP side (``proxycore/tunnel/mcp_http.py``): path
parsing, ``Accept`` negotiation, JSON-RPC classification, ``Mcp-Session-Id`` binding and
the JSON-RPC error / SSE event bytes."""

from __future__ import annotations

import json

import pytest

from proxycore.config import Tunnel
from proxycore.tunnel.http_api import body_limit
from proxycore.tunnel.mcp_http import (
    McpSessions,
    Target,
    classify,
    event,
    header,
    negotiate,
    parse_path,
    rpc_error,
    wants_stream,
)

PREFIX = "/reverse-proxy/sessions"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (PREFIX, Target("list")),
        (PREFIX + "/", Target("list")),
        (PREFIX + "/abc", Target("session", "abc")),
        (PREFIX + "/abc/", Target("session", "abc")),
        (PREFIX + "/abc/mcp", Target("mcp", "abc")),
        (PREFIX + "/my-server/events", Target("events", "my-server")),
        (PREFIX + "/abc/mcp/", Target("mcp", "abc")),
        (PREFIX + "/abc/other", None),
        (PREFIX + "/abc/mcp/x", None),
        (PREFIX + "//mcp", None),
        (PREFIX + "x", None),
        ("/reverse-proxy/ws", None),
        ("/elsewhere/sessions/abc", None),
    ],
)
def test_parse_path(path: str, expected: Target | None) -> None:
    assert parse_path(path, PREFIX) == expected


def test_parse_path_with_a_trailing_slash_prefix() -> None:
    assert parse_path(PREFIX + "/k/events", PREFIX + "/") == Target("events", "k")


@pytest.mark.parametrize(
    ("accept", "streaming", "expected"),
    [
        (None, False, "json"),
        (None, True, "sse"),
        (b"application/json, text/event-stream", False, "json"),
        (b"application/json, text/event-stream", True, "sse"),
        (b"application/json", True, "json"),
        (b"text/event-stream", False, "sse"),
        (b"*/*", False, "json"),
        (b"*/*", True, "sse"),
        (b"application/*", True, "json"),
        (b"text/*", False, "sse"),
        (b"text/html", False, None),
        (b"application/json;q=0, text/event-stream", False, "sse"),
        (b"text/event-stream;q=0, */*", True, "json"),
        (b"TEXT/EVENT-STREAM", False, "sse"),
        (b"application/json; q=bad", False, None),
        (b"", False, None),
    ],
)
def test_negotiate(accept: bytes | None, streaming: bool, expected: str | None) -> None:
    assert negotiate(accept, streaming) == expected


def test_header_joins_repeated_fields_case_insensitively() -> None:
    headers = [(b"Accept", b"text/event-stream"), (b"accept", b"application/json")]
    assert header(headers, b"accept") == b"text/event-stream,application/json"
    assert header(headers, b"mcp-session-id") is None
    assert negotiate(header(headers, b"accept"), False) == "json"


def test_wants_stream_only_with_a_progress_token() -> None:
    assert wants_stream({"params": {"_meta": {"progressToken": 7}}})
    assert wants_stream({"params": {"_meta": {"progressToken": "t"}}})
    assert not wants_stream({"params": {"_meta": {"progressToken": None}}})
    assert not wants_stream({"params": {"_meta": {}}})
    assert not wants_stream({"params": {"progressToken": 1}})  # not where MCP puts it
    assert not wants_stream({"params": [1]})
    assert not wants_stream({})


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}', "request"),
        (b'{"jsonrpc":"2.0","id":"a","method":"ping","params":{}}', "request"),
        (b'{"jsonrpc":"2.0","method":"notifications/initialized"}', "notification"),
        (b'{"jsonrpc":"2.0","id":4,"result":{}}', "response"),
        (b'{"jsonrpc":"2.0","id":4,"error":{"code":1,"message":"x"}}', "response"),
        (b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]', "batch"),
        (b"[]", "batch"),
        (b'{"jsonrpc":"2.0","id":1,"meth', "parse_error"),
        (b"\xff\xfe", "parse_error"),
        (b"", "parse_error"),
        (b'{"id":1,"method":"ping"}', "invalid"),
        (b'{"jsonrpc":"1.0","id":1,"method":"ping"}', "invalid"),
        (b'{"jsonrpc":"2.0","id":null,"method":"ping"}', "invalid"),
        (b'{"jsonrpc":"2.0","id":true,"method":"ping"}', "invalid"),
        (b'{"jsonrpc":"2.0","id":1.5,"method":"ping"}', "invalid"),
        (b'{"jsonrpc":"2.0","id":1,"method":5}', "invalid"),
        (b'{"jsonrpc":"2.0","id":1}', "invalid"),
        (b'"just a string"', "invalid"),
    ],
)
def test_classify(body: bytes, kind: str) -> None:
    got, message = classify(body)
    assert got == kind
    if kind in ("request", "notification", "response"):
        assert message == json.loads(body)
    else:
        assert message == {}


def test_classify_deep_nesting_is_a_parse_error_not_a_crash() -> None:
    assert classify(b"[" * 100_000)[0] in ("parse_error", "batch")
    assert classify(b'{"a":' * 100_000)[0] == "parse_error"


def test_mcp_session_ids_are_bound_to_their_tunnel_session() -> None:
    ids = McpSessions()
    value = ids.mint("tunnel-1")
    assert all(0x21 <= ord(c) <= 0x7E for c in value)  # visible ASCII, per the spec
    assert ids.valid(value.encode(), "tunnel-1")
    assert not ids.valid(value.encode(), "tunnel-2")  # a reconnected tunnel: a new session
    nonce = value.split(".")[0]
    assert not ids.valid(f"{nonce}.{'0' * 32}".encode(), "tunnel-1")  # forged mac
    assert not ids.valid(b"garbage", "tunnel-1")
    assert not McpSessions().valid(value.encode(), "tunnel-1")  # another process's key
    assert ids.mint("tunnel-1") != value


def test_ended_mcp_sessions_are_refused_and_the_memory_is_bounded() -> None:
    ids = McpSessions(max_ended=2)
    first, second, third = (ids.mint("t").encode() for _ in range(3))
    ids.end(first)
    assert not ids.valid(first, "t")
    assert ids.valid(second, "t")
    ids.end(second)
    ids.end(third)
    assert not ids.valid(second, "t") and not ids.valid(third, "t")
    assert ids.valid(first, "t")  # evicted: the oldest ended id is forgotten first


def test_rpc_error_names_the_type_and_request_id() -> None:
    assert rpc_error(7, -32002, "late", "timeout", "rid1") == {
        "jsonrpc": "2.0",
        "id": 7,
        "error": {
            "code": -32002,
            "message": "late",
            "data": {"type": "timeout", "request_id": "rid1"},
        },
    }


def test_event_is_one_data_line_even_with_newlines_in_strings() -> None:
    data = event("message", {"text": "a\nb\r\nc", "n": "é"})
    assert data.startswith(b"event: message\ndata: ")
    assert data.endswith(b"\n\n")
    lines = data[:-2].split(b"\n")
    assert len(lines) == 2
    assert json.loads(lines[1][len(b"data: ") :]) == {"text": "a\nb\r\nc", "n": "é"}


def test_body_limit_is_the_message_limit() -> None:
    assert body_limit(Tunnel(max_message_bytes=4096)) == 4096
