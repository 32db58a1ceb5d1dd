"""The tunnel's wire protocol (``tunnel/protocol.py``) and ``[tunnel]`` config: pure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxycore.config import Config, ConfigError, Route, Tunnel
from proxycore.tunnel.protocol import (
    GatewayHeartbeat,
    Heartbeat,
    IdRewriter,
    Notification,
    ProtocolError,
    Register,
    RegisterAck,
    Request,
    Response,
    ServerError,
    Unregister,
    error_frame,
    heartbeat_frame,
    is_notification,
    is_request,
    is_response,
    parse_client,
    parse_gateway,
    register_ack_frame,
    request_frame,
)


def test_parse_every_client_message() -> None:
    register = {"type": "register", "sessionId": "mine", "server": {"name": "fs"}}
    register["server"] = {"name": "fs", "description": "files", "protocol": "stdio"}
    assert parse_client(json.dumps(register)) == Register("fs", "files", "stdio", "mine")
    assert parse_client('{"type": "heartbeat", "sessionId": "s"}') == Heartbeat("s")
    assert parse_client('{"type": "unregister"}') == Unregister("")
    payload = {"jsonrpc": "2.0", "id": 1, "result": {}}
    frame = json.dumps({"type": "response", "payload": payload})
    assert parse_client(frame) == Response(payload)
    frame = json.dumps({"type": "notification", "sessionId": 5, "payload": payload})
    assert parse_client(frame) == Notification(payload, "")  # a non-string id is ignored


@pytest.mark.parametrize(
    ("frame", "says"),
    [
        ("nope", "not valid JSON"),
        ("3", "JSON object"),
        ("{}", "no 'type'"),
        ('{"type": 1}', "no 'type'"),
        ('{"type": "shout"}', "unknown message type 'shout'"),
        ('{"type": "register", "server": []}', "'server' object"),
        ('{"type": "register", "server": {"name": ""}}', "'name'"),
        ('{"type": "register", "server": {"name": "a", "protocol": 3}}', "'protocol'"),
        ('{"type": "response"}', "'payload'"),
        ('{"type": "notification", "payload": [1]}', "'payload'"),
        (b'{"type": "heartbeat"}', "binary"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_malformed_client_frames(frame: str | bytes, says: str) -> None:
    with pytest.raises(ProtocolError, match=says):
        parse_client(frame)


def test_size_limit_counts_utf8_bytes() -> None:
    frame = json.dumps({"type": "heartbeat", "pad": "é" * 600}, ensure_ascii=False)
    assert parse_client(frame, max_bytes=1300) == Heartbeat()
    with pytest.raises(ProtocolError, match="too large"):
        parse_client(frame, max_bytes=1100)  # 1200+ bytes, fewer characters


def test_gateway_frames_round_trip_through_the_client_parser() -> None:
    assert parse_gateway(register_ack_frame("g1")) == RegisterAck("g1", "success")
    assert json.loads(register_ack_frame("g1")) == {
        "type": "register_ack",
        "sessionId": "g1",
        "status": "success",
    }
    beat = parse_gateway(heartbeat_frame("g1"))
    assert isinstance(beat, GatewayHeartbeat) and beat.session_id == "g1"
    assert beat.timestamp.endswith("Z") and "T" in beat.timestamp
    payload = {"jsonrpc": "2.0", "id": 3, "method": "ping"}
    assert parse_gateway(request_frame("g1", payload)) == Request("g1", payload)
    assert json.loads(error_frame("bad")) == {"type": "error", "message": "bad"}
    assert parse_gateway(error_frame("bad")) == ServerError("bad")
    with pytest.raises(ProtocolError):
        parse_gateway('{"type": "register_ack"}')


def test_json_rpc_classification() -> None:
    request = {"jsonrpc": "2.0", "id": 1, "method": "roots/list"}
    note = {"jsonrpc": "2.0", "method": "notifications/progress"}
    answer = {"jsonrpc": "2.0", "id": 1, "result": {}}
    failure = {"jsonrpc": "2.0", "id": 1, "error": {"code": -1, "message": "x"}}
    assert [is_request(m) for m in (request, note, answer, failure)] == [1, 0, 0, 0]
    assert [is_notification(m) for m in (request, note, answer, failure)] == [0, 1, 0, 0]
    assert [is_response(m) for m in (request, note, answer, failure)] == [0, 0, 1, 1]
    assert not is_response({"jsonrpc": "2.0", "id": 1})


def test_id_rewriter_maps_both_ways_and_never_reuses() -> None:
    ids = IdRewriter()
    a, b = ids.assign(1), ids.assign(1)
    assert a != b and len(ids) == 2
    assert ids.restore(a) == 1 and ids.restore(b) == 1
    assert ids.rewrite({"id": 1, "method": "m"}, a) == {"id": a, "method": "m"}
    ids.release(a)
    with pytest.raises(KeyError):
        ids.restore(a)
    with pytest.raises(KeyError):
        ids.restore(True)  # a bool is not an id of ours
    assert ids.assign("x") not in (a, b)


# -- [tunnel] config ---------------------------------------------------------------------


def test_tunnel_adds_its_route_once_and_reserves_its_prefix() -> None:
    plain = Config(routes=(Route("/", "http://127.0.0.1:1/"),))
    assert plain.tunnel_route() is None and len(plain.routes) == 1
    config = Config(routes=(Route("/", "http://127.0.0.1:1/"),), tunnel=Tunnel(enabled=True))
    route = config.routes[-1]
    assert route.prefix == "/reverse-proxy/" and route.websocket and route.name == "tunnel"
    assert config.is_tunnel_route(route) and not config.is_tunnel_route(config.routes[0])
    assert len(config.with_routes(config.routes).routes) == 2
    named = Route("/t/", "http://127.0.0.1:1/", name="tunnel", websocket=True)
    assert not config.with_routes([named]).is_tunnel_route(named)
    with pytest.raises(ConfigError, match=r"routes\[0\].prefix: /reverse-proxy/ is taken"):
        Config(routes=(Route("/reverse-proxy/x/", "http://a/"),), tunnel=Tunnel(enabled=True))


def test_tunnel_toml_loads_and_reports_key_paths(tmp_path: Path) -> None:
    path = tmp_path / "proxycore.toml"
    path.write_text(
        '[tunnel]\nenabled = true\nallowed = ["bearer:0"]\nadmins = ["bearer:1"]\n'
        "max_message_bytes = 4096\n"
    )
    config = Config.from_toml(path)
    assert config.tunnel.allowed == ("bearer:0",) and config.tunnel.admins == ("bearer:1",)
    assert [r.prefix for r in config.routes] == ["/reverse-proxy/"]  # no [[routes]] needed
    assert config.routes[0].ws.max_message_bytes == 4 * 4096
    path.write_text(
        '[tunnel]\nenabled = "yes"\npath = "/ws"\nheartbeat_timeout = 0\nallowed = "x"\n'
        "max_sesions = 3\n[[routes]]\nprefix = '/'\nupstream = 'http://a/'\n"
    )
    with pytest.raises(ConfigError) as info:
        Config.from_toml(path)
    text = str(info.value)
    for problem in (
        "tunnel.enabled:",
        "tunnel.path: must be a path under /reverse-proxy/",
        "tunnel.heartbeat_timeout: must be > 0",
        "tunnel.allowed: expected an array of strings",
        "tunnel.max_sesions: unknown key",
        "did you mean 'max_sessions'?",
    ):
        assert problem in text
    assert text.startswith(str(path))
