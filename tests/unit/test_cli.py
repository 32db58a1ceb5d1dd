"""The ``proxycore`` command line: check, serve (config errors only) and the demo."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import proxycore.cli.commands
import proxycore.config
import proxycore.ops.server
from proxycore.cli.commands import EXIT_CONFIG, main

VALID_TOML = """\
[server]
listen = ["127.0.0.1:9999"]

[timeouts]
connect = 3
response = 60

[[routes]]
prefix = "/v1/"
upstream = "http://upstream.test:8000/api/"

[[routes]]
prefix = "/raw/"
upstream = "https://other.test/"
strip_prefix = false
preserve_host = true

[routes.timeouts]
idle = 5
"""

# Three independent mistakes, each in a different place.
INVALID_TOML = """\
[server]
max_header_count = 0

[[routes]]
prefix = "v1/"
upstream = "http://upstream.test/"

[[routes]]
prefix = "/ok/"
upstream = "ftp://upstream.test/"
"""

VALID_LEGACY = {
    "routes": [
        {
            "path": "/anthropic/",
            "upstream": "https://api.anthropic.com",
            "auth_scheme": "Bearer",
            "token_env": "ANTHROPIC_API_KEY",
        },
        {
            "path": "/local/",
            "upstream": "http://127.0.0.1:8000/v1/",
            "auth_scheme": "",
            "token_env": "LOCAL_TOKEN",
        },
    ]
}

SECRET = "sk-live-DO-NOT-PRINT-0123456789"
INVALID_LEGACY = {
    "routes": [
        {
            "path": "/no-trailing-slash",
            "upstream": "https://api.example.com",
            "auth_scheme": "Bearer",
            "token_env": SECRET,
        }
    ]
}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """``serve`` configures process-wide logging; put it back for the other tests."""
    loggers = [logging.getLogger("proxycore"), logging.getLogger("proxycore.access")]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, handlers, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


@pytest.fixture
def no_serving(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Replace the server so a wrongly accepted config fails the test instead of serving."""
    calls: list[object] = []

    async def fake_run(server: proxycore.ops.server.Server, *args: object) -> None:
        calls.append(server.config)

    monkeypatch.setattr(proxycore.cli.commands, "_run_process", fake_run)
    return calls


def test_check_valid_toml_prints_the_route_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "proxycore.toml", VALID_TOML)
    assert main(["check", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == "listen: 127.0.0.1:9999"
    assert lines[1].split()[:4] == ["PREFIX", "UPSTREAM", "STRIP", "HOST"]
    rows = {line.split()[0]: line.split() for line in lines[2:] if line.startswith("/")}
    assert rows["/v1/"] == [
        "/v1/",
        "http://upstream.test:8000/api/",
        "yes",
        "upstream",
        "3/60/3600/0",
        "none",
        "-",
    ]
    assert rows["/raw/"] == [
        "/raw/",
        "https://other.test/",
        "no",
        "client",
        "3/60/5/0",
        "none",
        "-",
    ]
    assert lines[-1] == "config OK"


def test_check_invalid_toml_reports_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "bad.toml", INVALID_TOML)
    assert main(["check", "--config", str(path)]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == ""
    assert "3 problem" in err
    problems = [line.strip() for line in err.splitlines()[1:] if line.strip()]
    assert len(problems) == 3, err
    for key in ("server.max_header_count", "routes[0].prefix", "routes[1].upstream"):
        assert any(p.startswith(f"{path}: {key}: ") for p in problems), (key, err)


def test_check_unreadable_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.toml"
    assert main(["check", "--config", str(missing)]) == EXIT_CONFIG
    assert str(missing) in capsys.readouterr().err


def test_check_valid_legacy_routes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "legacy.json", json.dumps(VALID_LEGACY))
    assert main(["check", "--routes", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    prefixes = [line.split()[0] for line in out.splitlines() if line.startswith("/")]
    assert prefixes == ["/anthropic/", "/local/"]
    assert "https://api.anthropic.com" in out
    assert out.splitlines()[-1] == "config OK"


def test_check_invalid_legacy_routes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "legacy.json", json.dumps(INVALID_LEGACY))
    assert main(["check", "--routes", str(path)]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == ""
    problems = [line.strip() for line in err.splitlines()[1:] if line.strip()]
    assert any(p.startswith(f"{path}: routes[0].path: ") for p in problems), err
    assert any(p.startswith(f"{path}: routes[0].token_env: ") for p in problems), err
    assert SECRET not in err  # a token pasted in place of a variable name is never echoed


def test_check_legacy_invalid_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "legacy.json", '{"routes": [')
    assert main(["check", "--routes", str(path)]) == EXIT_CONFIG
    assert f"{path}: invalid JSON" in capsys.readouterr().err


@pytest.mark.usefixtures("restore_logging")
def test_serve_with_invalid_config_exits_2_without_serving(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_serving: list[object]
) -> None:
    path = write(tmp_path, "bad.toml", INVALID_TOML)
    assert main(["serve", "--config", str(path)]) == EXIT_CONFIG
    assert no_serving == []
    err = capsys.readouterr().err
    for key in ("server.max_header_count", "routes[0].prefix", "routes[1].upstream"):
        assert f"{path}: {key}: " in err, (key, err)


@pytest.mark.usefixtures("restore_logging")
def test_serve_with_invalid_upstream_url_exits_2_without_serving(
    capsys: pytest.CaptureFixture[str], no_serving: list[object]
) -> None:
    assert main(["serve", "--upstream", "ftp://example.test/"]) == EXIT_CONFIG
    assert no_serving == []
    assert "scheme" in capsys.readouterr().err


@pytest.mark.usefixtures("restore_logging")
def test_serve_with_valid_config_reaches_the_server(
    tmp_path: Path, no_serving: list[object]
) -> None:
    # The counterpart of the tests above: the fake server is what a valid config reaches.
    path = write(tmp_path, "proxycore.toml", VALID_TOML)
    assert main(["serve", "--config", str(path), "--no-access-log"]) == 0
    assert len(no_serving) == 1


def test_demo_runs_end_to_end() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxycore", "demo", "--requests", "1", "--events", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "time to first byte" in result.stdout
    assert "done" in result.stdout
    assert "status 200" in result.stdout


def test_check_shows_injection_with_the_token_hidden(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PC_CHECK_TOKEN", "sk-very-secret-value")
    path = write(
        tmp_path,
        "inject.toml",
        '[[routes]]\nprefix = "/a/"\nupstream = "https://api.test/"\n'
        'inject = { header = "Authorization", scheme = "Bearer", token_env = "PC_CHECK_TOKEN" }\n',
    )
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Authorization:Bearer ***(env:PC_CHECK_TOKEN)" in out
    assert "sk-very-secret-value" not in out


# --------------------------------------------------------------------------- serve --listen


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[proxycore.ops.server.Server]:
    """Replace running the server: the ``Server`` that would have run is recorded."""
    servers: list[proxycore.ops.server.Server] = []

    async def fake_run(server: proxycore.ops.server.Server, *args: object) -> None:
        servers.append(server)

    monkeypatch.setattr(proxycore.cli.commands, "_run_process", fake_run)
    return servers


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("form", ["--config", "--routes", "--upstream"])
def test_serve_listen_applies_to_every_source(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    served: list[proxycore.ops.server.Server],
    form: str,
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k1")
    monkeypatch.setenv("LOCAL_TOKEN", "k2")
    sources = {
        "--config": str(write(tmp_path, "proxycore.toml", VALID_TOML)),
        "--routes": str(write(tmp_path, "routes.json", json.dumps(VALID_LEGACY))),
        "--upstream": "http://127.0.0.1:8000/",
    }
    argv = ["serve", form, sources[form], "--listen", "127.0.0.1:9123", "--no-access-log"]
    assert main(argv) == 0
    (server,) = served
    assert server.config.server.listen == ("127.0.0.1:9123",)
    if form != "--upstream":  # a reload (SIGHUP) of the file keeps --listen
        assert server.adjust is not None
        reloaded = server.adjust(proxycore.config.Config.load(sources[form]))
        assert reloaded.server.listen == ("127.0.0.1:9123",)


@pytest.mark.usefixtures("restore_logging")
def test_serve_without_listen_keeps_the_config_address(
    tmp_path: Path, served: list[proxycore.ops.server.Server]
) -> None:
    path = write(tmp_path, "proxycore.toml", VALID_TOML)
    assert main(["serve", "--config", str(path), "--no-access-log"]) == 0
    assert served[0].config.server.listen == ("127.0.0.1:9999",)
    assert served[0].adjust is None


@pytest.mark.usefixtures("restore_logging")
def test_serve_invalid_listen_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], served: list[proxycore.ops.server.Server]
) -> None:
    path = write(tmp_path, "proxycore.toml", VALID_TOML)
    assert main(["serve", "--config", str(path), "--listen", "nowhere"]) == EXIT_CONFIG
    assert served == []
    assert "proxycore: --listen: expected 'host:port'" in capsys.readouterr().err
