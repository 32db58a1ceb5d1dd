"""``proxycore loadtest`` on the command line: compare mode, thresholds, reports and
usage errors, against the simulator (hypercorn on 127.0.0.1). ``run`` calls
``trio.run`` itself, so it runs in a thread next to the test's servers."""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path

import pytest
import trio

from proxycore.cli import loadtest as loadtest_cli
from proxycore.tools.loadgen.spec import build_request
from proxycore.tools.sim import Receive, Scope, Send, make_app
from tests.helpers import start_app


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="proxycore loadtest")
    loadtest_cli.add_arguments(parser)
    return parser.parse_args(argv)


async def run(*argv: str) -> int:
    with trio.fail_after(20):
        code: int = await trio.to_thread.run_sync(loadtest_cli.run, parse(*argv))
    return code


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def labelled_sim(nursery: trio.Nursery, label: str, order: list[str], ttft: float) -> str:
    """A simulator whose chat requests append ``label`` to ``order``; its base URL."""
    inner = make_app(ttft=ttft, interval=0.001)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            order.append(label)
        await inner(scope, receive, send)

    host, port = await start_app(nursery, app)
    return f"http://{host}:{port}"


async def test_compare_runs_interleaved_rounds_with_ratios(
    nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    order: list[str] = []
    slow = await labelled_sim(nursery, "A", order, ttft=0.5)
    fast = await labelled_sim(nursery, "B", order, ttft=0.05)
    path = "/v1/chat/completions"
    code = await run(
        slow + path, fast + path, "--stream", "openai", "--max-tokens", "2",
        "-c", "1", "-n", "4", "--rounds", "2", "--json",
    )  # fmt: skip
    assert code == 0
    # Two requests per target per round; the second round visits them in reverse.
    assert order == ["A", "A", "B", "B", "B", "B", "A", "A"]
    data = json.loads(capsys.readouterr().out)
    assert data["rounds"] == 2
    first, second = data["targets"]
    assert first["url"].startswith(slow) and second["url"].startswith(fast)
    assert first["result"]["ok"] == second["result"]["ok"] == 4
    assert first["ratios"]["ttft_p50"] == 1.0
    assert first["ratios"]["errors"] is None  # no errors on the first: no ratio
    # 50 ms against 500 ms to the first token: B's TTFT is well under A's.
    assert 0 < second["ratios"]["ttft_p50"] < 1.0
    assert second["ratios"]["output_tokens"] == 1.0


async def test_compare_tables_show_ratios(
    nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    a = await labelled_sim(nursery, "A", [], ttft=0)
    b = await labelled_sim(nursery, "B", [], ttft=0)
    assert await run(a + "/small", b + "/small", "-n", "4", "-c", "1") == 0
    out = capsys.readouterr().out
    assert "comparison (ratio to the first target)" in out
    assert "(x" in out and "latency_p50" in out


async def test_thresholds_exit_3_and_name_the_failure(
    nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    base = await labelled_sim(nursery, "A", [], ttft=0.2)
    url = base + "/v1/messages"
    common = ("--stream", "anthropic", "--max-tokens", "2", "-n", "2", "-c", "1")
    # TTFT is at least 200 ms: the first threshold fails, the second holds.
    code = await run(url, *common, "--fail-if", "ttft_p99>100ms", "--fail-if", "errors>0.1%")
    assert code == 3
    err = capsys.readouterr().err
    assert "threshold failed: ttft_p99>100ms (measured" in err
    assert "errors>0.1%" not in err
    assert await run(url, *common, "--fail-if", "ttft_p99>60s", "--fail-if", "errors>0") == 0
    capsys.readouterr()
    assert await run(url, *common, "--json", "--fail-if", "rps>0") == 3
    data = json.loads(capsys.readouterr().out)
    assert data["thresholds"] == [
        {"threshold": "rps>0", "target": url, "failed": True, "value": data["rps"]}
    ]


def test_bad_thresholds_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("ttft_p99 800ms", "ttft_p42>1ms", "errors>1ms", "latency>1s"):
        with pytest.raises(SystemExit) as exc:
            parse("http://127.0.0.1/", "-n", "1", "--fail-if", bad)
        assert exc.value.code == 2
        assert "--fail-if" in capsys.readouterr().err


async def test_markdown_and_png_reports(
    nursery: trio.Nursery, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")  # the bench extra, installed by CI
    base = await labelled_sim(nursery, "A", [], ttft=0)
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    code = await run(
        base + "/v1/chat/completions", "--stream", "openai", "--max-tokens", "3",
        "-n", "3", "-c", "1", "--md", str(md), "--png", str(png),
    )  # fmt: skip
    assert code == 0
    text = md.read_text()
    assert "| ttft |" in text and "| itl |" in text and "output tokens" in text
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    out = capsys.readouterr().out
    assert "output tokens" in out and "usage in 3 streams" in out


def test_png_without_matplotlib_is_a_clear_usage_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    args = parse(f"http://127.0.0.1:{closed_port()}/", "-n", "1", "--png", str(tmp_path / "x.png"))
    assert loadtest_cli.run(args) == 2
    err = capsys.readouterr().err
    assert "--png needs matplotlib" in err and "pip install 'proxycore[report]'" in err


async def test_insecure_warns_loudly(capsys: pytest.CaptureFixture[str]) -> None:
    assert await run(f"https://127.0.0.1:{closed_port()}/", "-n", "1", "--insecure") == 1
    err = capsys.readouterr().err
    assert "WARNING: --insecure" in err and "NOT verified" in err
    assert await run(f"https://127.0.0.1:{closed_port()}/", "-n", "1") == 1
    assert "WARNING" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (("--max-tokens", "5"), "--max-tokens"),
        (("--stream", "sse", "--max-tokens", "5"), "--max-tokens"),
        (("--mcp-params", "{}"), "--mcp-params"),
        (("--mcp", "ping", "--mcp-params", "not json"), "--mcp-params"),
        (("--mcp", "ping", "--mcp-params", "[1]"), "--mcp-params"),
        (("--mcp", "ping", "--stream", "openai"), "--stream"),
        (("--ca-file", "/etc/hostname"), "--ca-file"),  # an http:// URL
        (("--insecure",), "--insecure"),
        (("--sni", "x"), "--sni"),
        (("--body-template", "/nonexistent"), "--body-template"),
        (("--rounds", "5"), "--rounds"),
        (("--md", "/nonexistent/dir/r.md"), "--md"),
        (("--sse", "--stream", "openai"), "--sse"),
    ],
)
def test_usage_errors_name_the_flag(
    argv: tuple[str, ...], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert loadtest_cli.run(parse("http://127.0.0.1:1/", "-n", "2", *argv)) == 2
    err = capsys.readouterr().err
    assert flag in err, err


def test_https_flag_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = "https://127.0.0.1:1/"
    assert loadtest_cli.run(parse(url, "-n", "1", "--ca-file", str(tmp_path / "none"))) == 2
    assert "--ca-file: cannot read" in capsys.readouterr().err
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    assert loadtest_cli.run(parse(url, "-n", "1", "--ca-file", str(ca), "--insecure")) == 2
    assert "--insecure: contradicts --ca-file" in capsys.readouterr().err
    spec = loadtest_cli.spec_from_args(parse(url, "-n", "1", "--ca-file", str(ca), "--sni", "a.b"))
    assert (spec.tls, spec.ca_file, spec.sni) == (True, str(ca), "a.b")
    # Host without the default port (443 for https, 80 for http), with any other.
    for target, host in (
        ("https://api.test/v1", b"api.test"),
        ("http://api.test/v1", b"api.test"),
        ("https://api.test:8443/v1", b"api.test:8443"),
        ("https://[::1]/v1", b"[::1]"),
    ):
        wire = build_request(loadtest_cli.spec_from_args(parse(target, "-n", "1")))
        assert b"\r\nHost: " + host + b"\r\n" in wire


def test_built_in_llm_request(tmp_path: Path) -> None:
    spec = loadtest_cli.spec_from_args(
        parse("http://h/v1/messages", "-n", "1", "--stream", "anthropic", "--max-tokens", "9")
    )
    assert spec.method == "POST"
    assert spec.body_template is not None
    assert json.loads(spec.body_template)["max_tokens"] == 9
    assert ("anthropic-version", "2023-06-01") in spec.headers
    template = tmp_path / "t.json"
    template.write_text('{"q": "{n}"}')
    custom = loadtest_cli.spec_from_args(
        parse("http://h/x", "-n", "1", "--stream", "sse", "--body-template", str(template))
    )
    assert (custom.method, custom.body_template) == ("POST", '{"q": "{n}"}')
    mcp = loadtest_cli.spec_from_args(parse("http://h/mcp", "-n", "1", "--mcp", "tools/list"))
    assert (mcp.method, mcp.mcp_method, mcp.mcp_params) == ("POST", "tools/list", None)
