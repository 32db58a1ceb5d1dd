"""The pure core of ``proxycore tunnel`` (proxycore/tunnel/client.py) and its argument parsing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from proxycore.cli.commands import build_parser
from proxycore.cli.tunnel import options_from_args
from proxycore.tunnel.client_wire import (
    Outbound,
    backoff_delay,
    classify_line,
    heartbeat_message,
    normalize_gateway_url,
    register_message,
    unregister_message,
    uplink_message,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://gw.example:8080", "ws://gw.example:8080/reverse-proxy/ws"),
        ("https://gw.example", "wss://gw.example/reverse-proxy/ws"),
        ("https://gw.example/", "wss://gw.example/reverse-proxy/ws"),
        ("ws://127.0.0.1:9000", "ws://127.0.0.1:9000/reverse-proxy/ws"),
        ("wss://gw.example/custom/ws", "wss://gw.example/custom/ws"),
        ("HTTP://gw.example/a?x=1", "ws://gw.example/a?x=1"),
    ],
)
def test_normalize_gateway_url(url: str, expected: str) -> None:
    assert normalize_gateway_url(url) == expected


@pytest.mark.parametrize("url", ["ftp://gw.example", "gw.example:80", "http://", ""])
def test_normalize_gateway_url_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        normalize_gateway_url(url)


def test_a_line_with_method_and_id_is_a_request_not_a_response() -> None:
    out = classify_line(b'{"jsonrpc":"2.0","id":7,"method":"roots/list"}')
    assert out == Outbound("request", {"jsonrpc": "2.0", "id": 7, "method": "roots/list"})
    assert out.wire_type == "notification"  # the wire has no type for a server request


def test_classify_response_notification_and_junk() -> None:
    response = classify_line('{"jsonrpc":"2.0","id":"a","result":{}}')
    assert response is not None and response.kind == "response"
    assert response.wire_type == "response"
    error = classify_line('{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"x"}}')
    assert error is not None and error.kind == "response"
    note = classify_line('{"jsonrpc":"2.0","method":"notifications/progress"}')
    assert note is not None and note.kind == "notification"
    assert note.wire_type == "notification"
    for junk in [b"not json", b"[1, 2]", b'"text"', b'{"id": 1}', b'{"jsonrpc":"2.0"}', b"\xff"]:
        assert classify_line(junk) is None, junk
    # an explicit null id with a method is a notification
    null_id = classify_line('{"jsonrpc":"2.0","id":null,"method":"x"}')
    assert null_id is not None and null_id.kind == "notification"


def test_backoff_doubles_caps_and_jitters() -> None:
    top = [backoff_delay(n, 1.0, 60.0, rand=lambda: 0.999999) for n in range(10)]
    assert [round(d) for d in top] == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]
    low = [backoff_delay(n, 1.0, 60.0, rand=lambda: 0.0) for n in range(8)]
    assert low == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff_delay(10_000, 0.5, 60.0, rand=lambda: 0.5) == pytest.approx(45.0)
    assert backoff_delay(0, 0.25, 60.0, rand=lambda: 0.5) == pytest.approx(0.1875)


def test_wire_messages() -> None:
    assert register_message("c1", "srv", "d") == {
        "type": "register",
        "sessionId": "c1",
        "server": {"name": "srv", "description": "d", "protocol": "stdio"},
    }
    assert heartbeat_message("s") == {"type": "heartbeat", "sessionId": "s"}
    assert unregister_message("s") == {"type": "unregister", "sessionId": "s"}
    out = Outbound("request", {"id": 1, "method": "ping"})
    assert uplink_message(out, "s") == {
        "type": "notification",
        "sessionId": "s",
        "payload": {"id": 1, "method": "ping"},
    }
    assert json.loads(json.dumps(uplink_message(out, "s"))) == uplink_message(out, "s")


def _args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["tunnel", *argv])


def test_cli_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REVERSE_PROXY_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    args = _args(
        [
            "--gateway",
            "https://gw.example",
            "--token-file",
            str(token_file),
            "--local-stdio",
            "/usr/bin/python3 -m 'my server'",
            "--max-retries",
            "3",
            "--keepalive",
            "5",
        ]
    )
    options = options_from_args(args)
    assert options.gateway == "wss://gw.example/reverse-proxy/ws"
    assert options.token == "s3cret"
    assert options.command == ("/usr/bin/python3", "-m", "my server")
    assert options.name == "python3"
    assert (options.reconnect_delay, options.max_retries, options.keepalive) == (1.0, 3, 5.0)


def test_cli_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REVERSE_PROXY_GATEWAY", "http://env-gw:1234")
    monkeypatch.setenv("REVERSE_PROXY_TOKEN", "env-token")
    options = options_from_args(_args(["--local-stdio", "srv", "--name", "mine"]))
    assert options.gateway == "ws://env-gw:1234/reverse-proxy/ws"
    assert options.token == "env-token"
    assert options.name == "mine"
    assert options_from_args(_args(["--local-stdio", "srv", "--token", "t"])).token == "t"


def test_cli_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REVERSE_PROXY_GATEWAY", raising=False)
    with pytest.raises(ValueError, match="--gateway"):
        options_from_args(_args(["--local-stdio", "srv"]))
    with pytest.raises(ValueError, match="empty"):
        options_from_args(_args(["--gateway", "ws://h", "--local-stdio", " "]))
    with pytest.raises(ValueError, match="token-file"):
        options_from_args(
            _args(["--gateway", "ws://h", "--local-stdio", "s", "--token-file", "/nope"])
        )
    with pytest.raises(SystemExit):
        _args(["--gateway", "ws://h", "--local-stdio", "s", "--token", "a", "--token-file", "b"])
