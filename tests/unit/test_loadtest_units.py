"""The load generator's pure parts: token-stream parsers, MCP replies, request bodies,
thresholds, figures, round splitting, comparison ratios and the CPU warning."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Mapping

import h11
import pytest

from proxycore.tools.hdr import Histogram
from proxycore.tools.loadgen import LoadResult, LoadSpec
from proxycore.tools.loadgen.bodies import RequestMaker, llm_body, render
from proxycore.tools.loadgen.compare import ratios, round_specs
from proxycore.tools.loadgen.figures import figures, merge
from proxycore.tools.loadgen.llm import SSESplitter, TokenStream
from proxycore.tools.loadgen.mcp import McpUser, read_reply, session_id
from proxycore.tools.loadgen.report import compare_rows, cpu_warning, markdown
from proxycore.tools.loadgen.thresholds import ThresholdError, check_thresholds, parse_threshold

SPEC = LoadSpec("127.0.0.1", 8080, requests=1)


def openai_chunk(content: str | None = None, **extra: object) -> bytes:
    event: dict[str, object] = dict(extra)
    if content is not None:
        event["choices"] = [{"index": 0, "delta": {"content": content}}]
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def feed_bytewise(stream: TokenStream, data: bytes, now: float) -> None:
    for i in range(len(data)):
        stream.feed(data[i : i + 1], now)


# --------------------------------------------------------------------------- token streams


def test_openai_ttft_is_the_first_non_empty_content_delta() -> None:
    s = TokenStream("openai")
    s.feed(b'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}\n\n', 1.0)
    s.feed(b": keep-alive\n\n", 1.5)
    s.feed(openai_chunk("Hello"), 2.0)
    s.feed(openai_chunk(" world") + openai_chunk("!"), 2.5)
    assert s.deltas == [2.0, 2.5, 2.5]  # the role chunk and the comment are no tokens
    assert s.usage_tokens is None
    assert s.tokens == 3  # counted deltas
    assert not s.terminated
    s.feed(b"data: [DONE]\n\n", 3.0)
    assert (s.terminated, s.failed) == (True, False)


def test_openai_usage_is_preferred_over_counted_deltas() -> None:
    s = TokenStream("openai")
    s.feed(openai_chunk("a") + openai_chunk("b"), 1.0)
    s.feed(openai_chunk(None, choices=[], usage={"completion_tokens": 42}), 1.1)
    s.feed(b"data: [DONE]\n\n", 1.2)
    assert (len(s.deltas), s.usage_tokens, s.tokens) == (2, 42, 42)


def test_openai_split_anywhere_with_crlf() -> None:
    wire = (openai_chunk("x") + openai_chunk("y") + b"data: [DONE]\n\n").replace(b"\n", b"\r\n")
    s = TokenStream("openai", keep_text=True)
    feed_bytewise(s, wire, 1.0)
    assert s.text == ["x", "y"]
    assert s.terminated


def test_openai_error_event_fails_the_stream() -> None:
    s = TokenStream("openai")
    s.feed(b'data: {"error": {"message": "overloaded"}}\n\n', 1.0)
    assert s.failed


def anthropic(kind: str, data: Mapping[str, object]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


def test_anthropic_stream() -> None:
    s = TokenStream("anthropic", keep_text=True)
    s.feed(anthropic("message_start", {"type": "message_start", "message": {}}), 1.0)
    s.feed(anthropic("ping", {"type": "ping"}), 1.1)
    for i, word in enumerate(["Hi", " there", ""]):
        delta = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": word}}
        s.feed(anthropic("content_block_delta", delta), 2.0 + i)
    assert s.deltas == [2.0, 3.0]  # the empty delta is no token
    usage = {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 9}}
    s.feed(anthropic("message_delta", usage), 5.0)
    assert not s.terminated
    s.feed(anthropic("message_stop", {"type": "message_stop"}), 5.1)
    assert (s.tokens, s.usage_tokens, s.terminated, s.failed) == (9, 9, True, False)
    assert s.text == ["Hi", " there"]


def test_anthropic_event_type_from_data_and_error_event() -> None:
    s = TokenStream("anthropic")
    delta = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "a"}}
    s.feed(b"data: " + json.dumps(delta).encode() + b"\n\n", 1.0)  # no event: field
    assert s.deltas == [1.0]
    s.feed(anthropic("error", {"type": "error", "error": {"type": "overloaded_error"}}), 2.0)
    assert s.failed


def test_plain_sse_counts_events_and_needs_no_terminator() -> None:
    s = TokenStream("sse")
    s.feed(b"data: a\n\nevent: x\ndata: b\n\n: comment\n\ndata:\n\n", 1.0)
    assert (len(s.deltas), s.tokens, s.terminated) == (2, 2, True)


def test_sse_splitter_joins_data_lines_and_names_events() -> None:
    events = SSESplitter().feed(b"event: e\ndata: 1\ndata: 2\nid: 7\n\nretry: 5\n\n")
    assert events == [(b"e", b"1\n2")]


# --------------------------------------------------------------------------- MCP


def test_mcp_reply_as_json_and_as_sse() -> None:
    json_head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n"
    assert read_reply(json_head, b'{"jsonrpc": "2.0", "id": 3, "result": {}}', 3) == (True, None)
    error = b'{"jsonrpc": "2.0", "id": 3, "error": {"code": -32601, "message": "no"}}'
    assert read_reply(json_head, error, 3) == (False, -32601)
    assert read_reply(json_head, b'{"jsonrpc": "2.0", "id": 2, "result": {}}', 3) == (False, None)
    assert read_reply(json_head, b"not json", 3) == (False, None)
    sse_head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n\r\n"
    body = (
        b'event: message\ndata: {"jsonrpc": "2.0", "method": "notifications/progress"}\n\n'
        b'event: message\r\ndata: {"jsonrpc": "2.0", "id": 5, "result": {"ok": 1}}\r\n\r\n'
    )
    assert read_reply(sse_head, body, 5) == (True, None)
    assert read_reply(sse_head, body, 6) == (False, None)


def test_mcp_session_id_and_user_requests() -> None:
    head = b"HTTP/1.1 200 OK\r\nMcp-Session-Id: abc123 \r\nContent-Length: 0\r\n\r\n"
    assert session_id(head) == b"abc123"
    assert session_id(b"HTTP/1.1 200 OK\r\n\r\n") is None
    user = McpUser("tools/call", '{"name": "echo"}')
    assert user.headers() == ()
    first, body = user.initialize()
    assert json.loads(body)["method"] == "initialize"
    user.session = b"abc123"
    second, body = user.call()
    assert second == first + 1
    assert json.loads(body) == {
        "jsonrpc": "2.0",
        "id": second,
        "method": "tools/call",
        "params": {"name": "echo"},
    }
    assert "id" not in json.loads(user.initialized())
    assert dict(user.headers())[b"Mcp-Session-Id"] == b"abc123"


# --------------------------------------------------------------------------- bodies


def test_render_replaces_n_and_rand_and_leaves_json_braces() -> None:
    rng = random.Random(1)
    template = '{"prompt": "request {n} {rand}"}'
    a, b = render(template, 1, rng), render(template, 2, rng)
    assert json.loads(a)["prompt"].startswith("request 1 ")
    assert json.loads(b)["prompt"].startswith("request 2 ")
    assert a.split()[-1] != b.split()[-1]  # {rand} differs
    assert len(json.loads(a)["prompt"].split()[-1]) == 16


def parse_request(wire: bytes) -> tuple[h11.Request, bytes]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(wire)
    request = conn.next_event()
    assert isinstance(request, h11.Request)
    body = b""
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        assert isinstance(event, h11.Data)
        body += event.data
    return request, body


@pytest.mark.parametrize("keepalive", [True, False])
def test_request_maker_builds_valid_requests_per_template(keepalive: bool) -> None:
    spec = LoadSpec(
        "127.0.0.1",
        80,
        method="POST",
        headers=(("X-A", "1"),),
        body_template=llm_body("openai", "m", 7),
        requests=1,
        keepalive=keepalive,
    )
    maker = RequestMaker(spec)
    assert maker.static is None
    one, two = (parse_request(maker.request(n)) for n in (1, 2))
    assert one[1] != two[1]
    request, body = one
    fields = dict(request.headers)
    assert fields[b"content-length"] == str(len(body)).encode()
    assert fields[b"x-a"] == b"1"
    assert (fields.get(b"connection") == b"close") is not keepalive
    data = json.loads(body)
    assert (data["max_tokens"], data["stream"], data["model"]) == (7, True, "m")
    assert data["stream_options"] == {"include_usage": True}
    assert "Request 1 (" in data["messages"][0]["content"]
    assert "max_tokens" in json.loads(llm_body("anthropic", "m", 3))


def test_request_maker_refuses_a_header_value_with_control_bytes() -> None:
    maker = RequestMaker(dataclasses.replace(SPEC, mcp_method="ping"))
    request, _ = parse_request(maker.with_body(b"{}", ((b"Mcp-Session-Id", b"s1"),)))
    assert dict(request.headers)[b"mcp-session-id"] == b"s1"
    with pytest.raises(ValueError):
        maker.with_body(b"{}", ((b"Mcp-Session-Id", b"a\r\nX-Evil: 1"),))


def test_spec_checks_the_new_fields() -> None:
    for fields in (
        {"stream": "grpc"},
        {"ca_file": "/x"},  # without tls
        {"insecure": True},
        {"tls": True, "sni": ""},
        {"mcp_method": "notifications/initialized"},
        {"mcp_method": "ping", "stream": "openai"},
        {"mcp_method": "ping", "body": b"x"},
        {"mcp_method": "ping", "mcp_params": "[1]"},
    ):
        with pytest.raises(ValueError):
            dataclasses.replace(SPEC, **fields)
    assert dataclasses.replace(SPEC, tls=True).url == "https://127.0.0.1:8080/"


# --------------------------------------------------------------------------- thresholds


def result(**fields: object) -> LoadResult:
    base = LoadResult(
        spec=SPEC,
        ok=0,
        errors=0,
        dropped=0,
        error_kinds={},
        elapsed=1.0,
        ttfb=Histogram(),
        latency=Histogram(),
        first_event=Histogram(),
        event_delay=Histogram(),
        body_bytes=0,
        events=0,
    )
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


def hist(*values: float) -> Histogram:
    h = Histogram()
    for v in values:
        h.record(v)
    return h


def test_threshold_grammar() -> None:
    t = parse_threshold("ttft_p99>800ms")
    assert (t.figure, t.op) == ("ttft_p99", ">")
    assert t.limit == pytest.approx(0.8)
    assert parse_threshold(" latency_p99.9 <= 2s ").limit == 2.0
    assert parse_threshold("itl_p50>=500us").limit == pytest.approx(0.0005)
    assert parse_threshold("ttfb_max>30").limit == pytest.approx(0.03)  # ms by default
    rate = parse_threshold("errors>0.1%")
    assert rate.figure == "error_rate"
    assert rate.limit == pytest.approx(0.001)
    assert parse_threshold("errors>5").figure == "errors"
    assert parse_threshold("rps<100").limit == 100
    assert parse_threshold("stream_tps_p50<20").figure == "stream_tps_p50"
    assert parse_threshold("cpu_share>80%").limit == pytest.approx(0.8)
    for bad in (
        "",
        "ttft_p99",
        "ttft_p99 800ms",
        "ttft_p99=800ms",
        "ttft_p42>1ms",
        "nonsense>1",
        "ttft_p99>800kg",
        "errors>1ms",
        "rps<5%",
        "stream_tps_p75<1",
        "ttft_p99>1e999ms",
    ):
        with pytest.raises(ThresholdError):
            parse_threshold(bad)


def test_thresholds_fail_when_their_comparison_holds() -> None:
    r = result(ok=999, errors=1, started=1000, error_kinds={"reset": 1}, ttft=hist(0.5, 0.9))
    failures, checks = check_thresholds(
        [parse_threshold("ttft_p99>800ms"), parse_threshold("errors>0.1%")], [r]
    )
    assert failures == ["ttft_p99>800ms (measured 900ms)"]  # 0.1% errors is not > 0.1%
    assert [c["failed"] for c in checks] == [True, False]
    failures, _ = check_thresholds([parse_threshold("errors>=0.1%")], [r])
    assert failures == ["errors>=0.1% (measured 0.1%)"]


# --------------------------------------------------------------------------- figures, rounds


def test_figures_and_merge() -> None:
    a = result(ok=2, started=2, ttft=hist(0.1, 0.2), output_tokens=10, stream_tps=[5.0])
    b = result(ok=1, errors=1, started=2, error_kinds={"incomplete": 1}, ttft=hist(0.3))
    merged = merge([a, b])
    assert (merged.ok, merged.errors, merged.started, merged.elapsed) == (3, 1, 4, 2.0)
    assert merged.error_kinds == {"incomplete": 1}
    assert merged.ttft.count == 3
    assert a.ttft.count == 2  # the inputs are left alone
    values = figures(merged)
    assert values["error_rate"] == 0.25
    assert values["ttft_max"] == pytest.approx(0.3)
    assert values["tokens_per_s"] == 5.0
    assert values["stream_tps_p50"] == 5.0


def test_round_specs_split_requests_and_duration() -> None:
    parts = round_specs(dataclasses.replace(SPEC, requests=10), 4)
    assert [p.requests for p in parts if p is not None] == [3, 3, 2, 2]
    timed = round_specs(LoadSpec("h", 80, duration=2.0), 4)
    assert [p.duration for p in timed if p is not None] == [0.5] * 4
    assert round_specs(dataclasses.replace(SPEC, requests=2), 3)[2] is None
    with pytest.raises(ValueError):
        round_specs(SPEC, 0)


def test_ratios_to_the_first_target() -> None:
    first = result(ok=10, ttft=hist(0.2), latency=hist(1.0))
    second = result(
        ok=10, ttft=hist(0.3), latency=hist(0.5), spec=dataclasses.replace(SPEC, port=9)
    )
    a, b = ratios([first, second])
    assert a["ttft_p50"] == 1.0
    assert b["ttft_p50"] == pytest.approx(1.5, rel=0.01)
    assert b["latency_max"] == pytest.approx(0.5)
    assert b["errors"] is None  # the first had none: no ratio
    rows = dict(compare_rows([first, second]))
    assert rows["latency_p50"][1].endswith("(x0.50)")
    assert rows["errors"][1] == "0 (-)"
    assert "| latency_p50 |" in markdown([first, second])


def test_cpu_warning_over_80_percent_of_a_core() -> None:
    assert cpu_warning(result(cpu_seconds=0.5)) is None
    warning = cpu_warning(result(cpu_seconds=0.93))
    assert warning is not None and "93% of a core" in warning and "bottleneck" in warning
