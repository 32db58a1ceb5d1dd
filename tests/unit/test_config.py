"""Tests for proxycore.config: dataclass validation, TOML loading and the legacy JSON table."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxycore.config import (
    Config,
    ConfigError,
    Inject,
    PoolSettings,
    Route,
    ServerSettings,
    Timeouts,
    Upstream,
)

ROUTE = '[[routes]]\nprefix = "/v1/"\nupstream = "http://upstream.test/"\n'


def write(tmp_path: Path, text: str, name: str = "proxycore.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path, text: str) -> tuple[str, ...]:
    """Load ``text`` as TOML from a file and return the reported problems."""
    with pytest.raises(ConfigError) as info:
        Config.from_toml(write(path, text))
    return info.value.problems


def route_problems(**kwargs: Any) -> tuple[str, ...]:
    kwargs.setdefault("prefix", "/v1/")
    kwargs.setdefault("upstream", "http://upstream.test/")
    with pytest.raises(ConfigError) as info:
        Route(**kwargs)
    return info.value.problems


def legacy_problems(tmp_path: Path, data: Any) -> tuple[str, ...]:
    path = write(tmp_path, json.dumps(data), "routes.json")
    with pytest.raises(ConfigError) as info:
        Config.from_legacy_json(path)
    return info.value.problems


LEGACY_ROUTE = {
    "path": "/anthropic/",
    "upstream": "https://api.anthropic.com",
    "auth_scheme": "Bearer",
    "token_env": "ANTHROPIC_API_KEY",
}


# --------------------------------------------------------------------------- module hygiene


def test_module_is_pure() -> None:
    """The config package (model, load, checks) imports neither trio nor h11.

    The package's ``__init__`` (which imports the server) is bypassed with a bare package
    module, and importing trio or h11 is made to fail.
    """
    package = Path(__file__).resolve().parents[2] / "proxycore"
    code = (
        "import sys, types\n"
        "sys.modules['trio'] = None\n"
        "sys.modules['h11'] = None\n"
        "pkg = types.ModuleType('proxycore')\n"
        f"pkg.__path__ = [{str(package)!r}]\n"
        "sys.modules['proxycore'] = pkg\n"
        "import proxycore.config as module\n"
        "module.Config(routes=(module.Route('/', 'http://h/'),))\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_config_error_joins_problems() -> None:
    exc = ConfigError(["a: one", "b: two"])
    assert exc.problems == ("a: one", "b: two")
    assert str(exc) == "a: one\nb: two"
    assert ConfigError("single").problems == ("single",)
    assert isinstance(exc, Exception)


def test_config_error_pickles() -> None:
    exc = pickle.loads(pickle.dumps(ConfigError(["a: one", "b: two"])))
    assert exc.problems == ("a: one", "b: two")


# --------------------------------------------------------------------------- Upstream / Route


def test_route_in_code_defaults() -> None:
    route = Route(prefix="/v1/", upstream="https://llm.internal:8443/api/")
    assert route.target == Upstream("https", "llm.internal", 8443, "/api/")
    assert route.name == "/v1/"
    assert route.strip_prefix is True
    assert route.preserve_host is False
    assert route.accept_encoding == "passthrough"
    assert route.ca_file is None
    assert route.timeouts is None
    assert route.inject is None
    assert route.target.origin == ("https", "llm.internal", 8443)
    assert route.target.host_header == "llm.internal:8443"


def test_route_explicit_name_kept() -> None:
    assert Route("/v1/", "http://h/", name="llm").name == "llm"


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port", "base_path", "host_header"),
    [
        ("http://h", "http", "h", 80, "/", "h"),
        ("https://h", "https", "h", 443, "/", "h"),
        ("http://h:80/", "http", "h", 80, "/", "h"),
        ("https://h:443/x", "https", "h", 443, "/x", "h"),
        ("http://h:443/", "http", "h", 443, "/", "h:443"),
        ("https://h:80/", "https", "h", 80, "/", "h:80"),
        (
            "http://LLM.Internal:8080/API/",
            "http",
            "llm.internal",
            8080,
            "/API/",
            "llm.internal:8080",
        ),
        ("HTTPS://h/", "https", "h", 443, "/", "h"),
        ("http://10.0.0.1:8000/v1", "http", "10.0.0.1", 8000, "/v1", "10.0.0.1:8000"),
        ("http://[::1]/", "http", "::1", 80, "/", "[::1]"),
        (
            "https://[2001:DB8::1]:8443/a/",
            "https",
            "2001:db8::1",
            8443,
            "/a/",
            "[2001:db8::1]:8443",
        ),
    ],
)
def test_upstream_parsing(
    url: str, scheme: str, host: str, port: int, base_path: str, host_header: str
) -> None:
    target = Route("/p/", url).target
    assert (target.scheme, target.host, target.port, target.base_path) == (
        scheme,
        host,
        port,
        base_path,
    )
    assert target.host_header == host_header
    assert target.origin == (scheme, host, port)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"prefix": "v1/"}, "prefix: must start with '/', got 'v1/'"),
        ({"prefix": ""}, "prefix: must start with '/'"),
        ({"prefix": "/a?b"}, "prefix: must be ASCII without whitespace"),
        ({"prefix": "/a#b"}, "prefix: must be ASCII without whitespace"),
        ({"prefix": "/a b/"}, "prefix: must be ASCII without whitespace"),
        ({"prefix": "/a\tb/"}, "prefix: must be ASCII without whitespace"),
        ({"prefix": "/a\x00/"}, "prefix: must be ASCII without whitespace"),
        ({"prefix": "/a\x7f/"}, "prefix: must be ASCII without whitespace"),
        ({"prefix": "/caf\u00e9/"}, "prefix: must be ASCII without whitespace"),
        ({"prefix": "/a/../b/"}, "prefix: must not contain '.' or '..' segments"),
        ({"prefix": "/./"}, "prefix: must not contain '.' or '..' segments"),
        ({"prefix": "/a/.."}, "prefix: must not contain '.' or '..' segments"),
        ({"prefix": "/a/%2e%2E/"}, "prefix: must not contain '.' or '..' segments"),
        ({"prefix": "/a/.%2e/"}, "prefix: must not contain '.' or '..' segments"),
        ({"prefix": "/%2E/"}, "prefix: must not contain '.' or '..' segments"),
        ({"prefix": 1}, "prefix: expected a string, got integer 1"),
        ({"upstream": "ftp://h/"}, "upstream: scheme must be http or https, got 'ftp'"),
        ({"upstream": "ws://h/"}, "upstream: scheme must be http or https, got 'ws'"),
        ({"upstream": "llm.internal:8080"}, "upstream: must be an absolute URL"),
        ({"upstream": "/relative"}, "upstream: must be an absolute URL"),
        ({"upstream": "http:///path"}, "upstream: host is required"),
        ({"upstream": "http://:8080/"}, "upstream: host is required"),
        ({"upstream": "http://h/?q=1"}, "upstream: must not contain a query string or fragment"),
        ({"upstream": "http://h/?"}, "upstream: must not contain a query string or fragment"),
        ({"upstream": "http://h/#frag"}, "upstream: must not contain a query string or fragment"),
        ({"upstream": "http://u@h/"}, "upstream: must not contain credentials"),
        ({"upstream": "http://h:0/"}, "upstream: port must be between 1 and 65535"),
        ({"upstream": "http://h:65536/"}, "upstream: port must be between 1 and 65535"),
        ({"upstream": "http://h:http/"}, "upstream: port must be between 1 and 65535"),
        ({"upstream": "http://[::zz]/"}, "upstream: invalid"),
        ({"upstream": "http://[::1/"}, "upstream: invalid URL"),
        ({"upstream": "http://h%41/"}, "upstream: invalid host"),
        ({"upstream": "http://h/a/../b"}, "upstream: path must not contain '.' or '..' segments"),
        ({"upstream": "http://h /"}, "upstream: must be ASCII without whitespace"),
        ({"upstream": "http://h/\n"}, "upstream: must be ASCII without whitespace"),
        ({"upstream": "http://h\u00e9.test/"}, "upstream: must be ASCII without whitespace"),
        ({"upstream": None}, "upstream: exactly one of upstream or upstreams must be set"),
        ({"strip_prefix": "yes"}, "strip_prefix: expected a boolean, got string 'yes'"),
        ({"preserve_host": 1}, "preserve_host: expected a boolean, got integer 1"),
        ({"accept_encoding": "gzip"}, "accept_encoding: must be 'passthrough' or 'identity'"),
        ({"ca_file": "/ca.pem"}, "ca_file: only allowed for https upstreams"),
        ({"upstream": "https://h/", "ca_file": ""}, "ca_file: must be a non-empty file path"),
        ({"timeouts": {"connect": 1}}, "timeouts: expected Timeouts, got a table"),
        ({"inject": "Bearer x"}, "inject: expected Inject, got string"),
        ({"name": 5}, "name: expected a string, got integer 5"),
    ],
)
def test_route_rejects(kwargs: dict[str, Any], expected: str) -> None:
    problems = route_problems(**kwargs)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems


def test_route_accepts_edge_values() -> None:
    assert Route("/", "http://h/").prefix == "/"
    assert Route("/v1", "http://h/").prefix == "/v1"
    assert Route("/a.b/..c/", "http://h/").prefix == "/a.b/..c/"
    route = Route("/v1/", "https://h/", ca_file="/etc/ca.pem", accept_encoding="identity")
    assert route.ca_file == "/etc/ca.pem"
    assert route.accept_encoding == "identity"


def test_route_collects_all_problems_in_code() -> None:
    problems = route_problems(prefix="v1", upstream="ftp://h/", accept_encoding="br", name=3)
    assert [p.split(":")[0] for p in problems] == ["prefix", "upstream", "accept_encoding", "name"]


@pytest.mark.parametrize(
    "url",
    [
        "https://user:sk-ant-SECRET@h/",
        "https://h:sk-ant-SECRET/",
        "https://h/?key=sk-ant-SECRET",
        "https://h/#sk-ant-SECRET",
        "ftp://h/sk-ant-SECRET",
        "https://h/sk-ant-SECRET /",
    ],
)
def test_upstream_errors_never_echo_url(url: str) -> None:
    problems = route_problems(upstream=url)
    assert problems
    assert all("SECRET" not in p for p in problems)


def test_upstream_is_a_plain_value() -> None:
    up = Upstream("http", "::1", 8080, "/")
    assert up.host_header == "[::1]:8080"
    assert Upstream("https", "h", 443, "/").host_header == "h"


# --------------------------------------------------------------------------- Timeouts / Inject


def test_timeouts_defaults_and_int_coercion() -> None:
    assert Timeouts() == Timeouts(10.0, 3600.0, 3600.0, 0.0)
    t = Timeouts(connect=5, response=60, idle=1, total=0)
    assert t == Timeouts(5.0, 60.0, 1.0, 0.0)
    assert all(isinstance(getattr(t, f.name), float) for f in dataclasses.fields(t))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"connect": 0}, "connect: must be > 0, got 0"),
        ({"response": 0.0}, "response: must be > 0, got 0"),
        ({"idle": -1}, "idle: must be > 0, got -1"),
        ({"total": -0.5}, "total: must be >= 0, got -0.5"),
        ({"connect": math.inf}, "connect: must be a finite number, got inf"),
        ({"total": math.nan}, "total: must be a finite number, got nan"),
        ({"connect": True}, "connect: expected a number, got boolean true"),
        ({"idle": "10"}, "idle: expected a number, got string '10'"),
        ({"total": None}, "total: expected a number, got NoneType"),
        ({"connect": 10**400}, "connect: must be a finite number"),
    ],
)
def test_timeouts_reject(kwargs: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        Timeouts(**kwargs)
    assert info.value.problems == (expected,) or info.value.problems[0].startswith(expected)
    assert len(info.value.problems) == 1


def test_timeouts_collects_all() -> None:
    with pytest.raises(ConfigError) as info:
        Timeouts(connect=0, response=-1, idle="x", total=-1)  # type: ignore[arg-type]
    assert len(info.value.problems) == 4


def test_inject_valid_forms() -> None:
    env = Inject(token_env="ANTHROPIC_API_KEY")
    assert (env.header, env.scheme, env.token_env, env.token_file) == (
        "Authorization",
        None,
        "ANTHROPIC_API_KEY",
        None,
    )
    f = Inject(header="x-api-key", scheme="token", token_file="/run/secrets/key")
    assert f.token_file == "/run/secrets/key"
    assert f.header == "x-api-key"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, "token_env: exactly one of token_env or token_file must be set"),
        ({"token_env": "A", "token_file": "/f"}, "token_env: exactly one of"),
        ({"token_env": "A", "header": "x api"}, "header: must be a valid HTTP header name"),
        ({"token_env": "A", "header": ""}, "header: must be a valid HTTP header name"),
        ({"token_env": "A", "header": "x:y"}, "header: must be a valid HTTP header name"),
        ({"token_env": "A", "scheme": "Bearer x"}, "scheme: must be a single token"),
        ({"token_env": "A", "scheme": ""}, "scheme: must be a single token"),
        ({"token_env": "1ABC"}, "token_env: must be the name of an environment variable"),
        ({"token_env": "sk-ant-x"}, "token_env: must be the name of an environment variable"),
        ({"token_file": ""}, "token_file: must be a non-empty file path"),
        ({"token_env": 5}, "token_env: expected a string, got integer"),
    ],
)
def test_inject_rejects(kwargs: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        Inject(**kwargs)
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


def test_inject_never_echoes_values() -> None:
    secret = "sk-ant-api03-SECRETVALUE"
    with pytest.raises(ConfigError) as info:
        Inject(header=secret + " x", scheme=f"Bearer {secret}", token_env=secret)
    assert len(info.value.problems) == 3
    assert "SECRETVALUE" not in str(info.value)


# --------------------------------------------------------------------------- server / pool


def test_server_defaults() -> None:
    s = ServerSettings()
    assert s.listen == ("127.0.0.1:8080",)
    assert s.listen_addresses == (("127.0.0.1", 8080),)
    assert (s.max_connections, s.max_header_bytes, s.max_header_count) == (10000, 65536, 100)
    assert (s.header_timeout, s.keepalive_timeout) == (30.0, 75.0)


def test_listen_parsing_ipv4_ipv6_hostnames() -> None:
    s = ServerSettings(
        listen=("[::1]:8080", "0.0.0.0:0", "localhost:65535", "[fe80::1%eth0]:80", "[::]:443")
    )
    assert s.listen_addresses == (
        ("::1", 8080),
        ("0.0.0.0", 0),
        ("localhost", 65535),
        ("fe80::1%eth0", 80),
        ("::", 443),
    )


def test_listen_string_and_list_are_coerced_to_tuple() -> None:
    assert ServerSettings(listen="[::1]:9000").listen == ("[::1]:9000",)  # type: ignore[arg-type]
    assert ServerSettings(listen=["a:1", "b:2"]).listen == ("a:1", "b:2")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("::1:8080", "listen: IPv6 addresses must be in brackets"),
        ("[::1]8080", "listen: expected 'host:port' or '[ipv6]:port'"),
        ("[::1]", "listen: expected 'host:port' or '[ipv6]:port'"),
        ("localhost", "listen: expected 'host:port' or '[ipv6]:port'"),
        (":8080", "listen: expected 'host:port' or '[ipv6]:port'"),
        ("h:", "listen: port must be between 0 and 65535, got ''"),
        ("h:65536", "listen: port must be between 0 and 65535, got '65536'"),
        ("h:-1", "listen: port must be between 0 and 65535"),
        ("h:80x", "listen: port must be between 0 and 65535"),
        ("h:999999999999", "listen: port must be between 0 and 65535"),
        ("[zz]:80", "listen: invalid IPv6 address 'zz'"),
        ("bad host:80", "listen: invalid host 'bad host'"),
        (("a:1", 8080), "listen[1]: expected a string, got integer 8080"),
        (("a:1", "b"), "listen[1]: expected 'host:port'"),
        ((), "listen: at least one address is required"),
        (8080, "listen: expected a string or an array of strings, got integer 8080"),
    ],
)
def test_listen_rejects(listen: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        ServerSettings(listen=listen)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(expected), info.value.problems


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"max_connections": 0}, "max_connections: must be >= 1, got 0"),
        ({"max_connections": True}, "max_connections: expected an integer, got boolean true"),
        ({"max_connections": 1.5}, "max_connections: expected an integer, got float 1.5"),
        ({"max_header_bytes": 1023}, "max_header_bytes: must be >= 1024, got 1023"),
        ({"max_header_count": 0}, "max_header_count: must be >= 1, got 0"),
        ({"header_timeout": 0}, "header_timeout: must be > 0, got 0"),
        ({"keepalive_timeout": -1}, "keepalive_timeout: must be > 0, got -1"),
    ],
)
def test_server_rejects(kwargs: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        ServerSettings(**kwargs)
    assert info.value.problems == (expected,)


def test_server_boundaries_accepted() -> None:
    s = ServerSettings(max_connections=1, max_header_bytes=1024, max_header_count=1)
    assert s.max_header_bytes == 1024
    assert isinstance(ServerSettings(header_timeout=5).header_timeout, float)


def test_pool_settings() -> None:
    assert PoolSettings() == PoolSettings(32, 60.0)
    assert PoolSettings(max_idle_per_origin=0).max_idle_per_origin == 0
    with pytest.raises(ConfigError) as info:
        PoolSettings(max_idle_per_origin=-1, idle_timeout=0)
    assert info.value.problems == (
        "max_idle_per_origin: must be >= 0, got -1",
        "idle_timeout: must be > 0, got 0",
    )


# --------------------------------------------------------------------------- Config in code


def test_config_in_code() -> None:
    a = Route("/a/", "http://a/")
    b = Route("/b/", "http://b/", timeouts=Timeouts(response=5))
    config = Config(routes=[a, b])  # type: ignore[arg-type]
    assert config.routes == (a, b)
    assert config.server == ServerSettings()
    assert config.timeouts == Timeouts()
    assert config.pool == PoolSettings()
    assert config.source is None
    assert config.timeouts_for(a) is config.timeouts
    assert config.timeouts_for(b) == Timeouts(response=5)


def test_config_zero_routes_allowed_in_code() -> None:
    assert Config().routes == ()


def test_config_duplicate_prefixes() -> None:
    with pytest.raises(ConfigError) as info:
        Config(
            routes=(
                Route("/api", "http://a/"),
                Route("/b/", "http://b/"),
                Route("/api/", "http://c/"),
            )
        )
    assert info.value.problems == ("routes[2].prefix: duplicate of routes[0] ('/api/')",)


def test_config_rejects_wrong_types_in_code() -> None:
    with pytest.raises(ConfigError) as info:
        Config(routes=("x",), server={}, timeouts=None, pool=1, source=3)  # type: ignore[arg-type]
    assert [p.split(":")[0] for p in info.value.problems] == [
        "routes[0]",
        "server",
        "timeouts",
        "pool",
        "source",
    ]


def test_with_routes() -> None:
    config = Config(routes=(Route("/a/", "http://a/"),), timeouts=Timeouts(connect=1))
    new = config.with_routes([Route("/b/", "http://b/")])
    assert [r.prefix for r in new.routes] == ["/b/"]
    assert isinstance(new.routes, tuple)
    assert new.timeouts == config.timeouts
    assert [r.prefix for r in config.routes] == ["/a/"]
    with pytest.raises(ConfigError):
        config.with_routes([Route("/b", "http://b/"), Route("/b/", "http://c/")])


def test_config_is_hashable_and_comparable() -> None:
    a = Config(routes=(Route("/a/", "http://a/"),))
    b = Config(routes=(Route("/a/", "http://a/"),))
    assert a == b
    assert hash(a) == hash(b)


@pytest.mark.parametrize(
    ("obj", "attr"),
    [
        (Route("/a/", "http://a/"), "prefix"),
        (Route("/a/", "http://a/"), "target"),
        (Route("/a/", "http://a/").target, "host"),
        (Timeouts(), "connect"),
        (Inject(token_env="A"), "token_env"),
        (ServerSettings(), "listen"),
        (PoolSettings(), "idle_timeout"),
        (Config(), "routes"),
    ],
)
def test_immutability(obj: object, attr: str) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, attr, None)


def test_defaults_are_not_shared_mutable_state() -> None:
    assert Config().server is Config().server  # frozen, so sharing is safe
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().server.max_connections = 1  # type: ignore[misc]


# --------------------------------------------------------------------------- TOML


FULL_TOML = """
[server]
listen = ["127.0.0.1:8080", "[::1]:8080"]
max_connections = 500
max_header_bytes = 32768
max_header_count = 50
header_timeout = 10
keepalive_timeout = 5.5

[timeouts]
connect = 5
response = 600
idle = 300
total = 0

[pool]
max_idle_per_origin = 8
idle_timeout = 30

[[routes]]
prefix = "/v1/"
upstream = "https://llm.internal:8443/api/"
strip_prefix = true
preserve_host = false
accept_encoding = "passthrough"
ca_file = "ca.pem"
timeouts = { response = 60 }
inject = { header = "x-api-key", token_env = "ANTHROPIC_API_KEY" }
name = "llm"

[[routes]]
prefix = "/raw"
upstream = "http://10.0.0.2:9000"
strip_prefix = false
preserve_host = true
accept_encoding = "identity"
inject = { scheme = "Bearer", token_file = "secrets/token" }
"""


def test_full_toml(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("dummy")
    path = write(tmp_path, FULL_TOML)
    config = Config.from_toml(path)
    assert config.source == str(path)
    assert config.server == ServerSettings(
        listen=("127.0.0.1:8080", "[::1]:8080"),
        max_connections=500,
        max_header_bytes=32768,
        max_header_count=50,
        header_timeout=10.0,
        keepalive_timeout=5.5,
    )
    assert config.server.listen_addresses == (("127.0.0.1", 8080), ("::1", 8080))
    assert config.timeouts == Timeouts(connect=5, response=600, idle=300, total=0)
    assert config.pool == PoolSettings(max_idle_per_origin=8, idle_timeout=30)
    llm, raw = config.routes
    assert llm.prefix == "/v1/"
    assert llm.name == "llm"
    assert llm.target == Upstream("https", "llm.internal", 8443, "/api/")
    assert llm.ca_file == str(tmp_path / "ca.pem")
    # per-route override merged over the global [timeouts]
    assert llm.timeouts == Timeouts(connect=5, response=60, idle=300, total=0)
    assert config.timeouts_for(llm) == llm.timeouts
    assert llm.inject == Inject(header="x-api-key", token_env="ANTHROPIC_API_KEY")
    assert raw.name == "/raw"
    assert (raw.strip_prefix, raw.preserve_host, raw.accept_encoding) == (False, True, "identity")
    assert raw.timeouts is None
    assert config.timeouts_for(raw) is config.timeouts
    assert raw.inject == Inject(scheme="Bearer", token_file=str(tmp_path / "secrets" / "token"))
    assert raw.target.host_header == "10.0.0.2:9000"


def test_minimal_toml_uses_defaults(tmp_path: Path) -> None:
    config = Config.from_toml(write(tmp_path, ROUTE))
    assert config.server == ServerSettings()
    assert config.timeouts == Timeouts()
    assert config.pool == PoolSettings()
    assert config.routes == (Route("/v1/", "http://upstream.test/"),)


def test_toml_listen_string_and_ipv6(tmp_path: Path) -> None:
    config = Config.from_toml(write(tmp_path, '[server]\nlisten = "[::1]:9000"\n' + ROUTE))
    assert config.server.listen == ("[::1]:9000",)
    assert config.server.listen_addresses == (("::1", 9000),)


def test_toml_ints_accepted_as_floats(tmp_path: Path) -> None:
    config = Config.from_toml(write(tmp_path, "[server]\nheader_timeout = 7\n" + ROUTE))
    assert config.server.header_timeout == 7.0
    assert isinstance(config.server.header_timeout, float)


def test_route_timeout_merge_over_defaults_when_no_global(tmp_path: Path) -> None:
    text = ROUTE + "timeouts = { idle = 5, total = 100 }\n"
    (route,) = Config.from_toml(write(tmp_path, text)).routes
    assert route.timeouts == Timeouts(connect=10, response=3600, idle=5, total=100)


def test_spec_error_examples(tmp_path: Path) -> None:
    text = (
        "[server]\nmax_connections = '10'\n"
        + ROUTE
        + "timeouts = { respnse = 60 }\n"
        + '[[routes]]\nprefix = "/v2/"\nupstream = "ftp://h/"\n'
    )
    path = tmp_path / "proxycore.toml"
    problems = problems_of(tmp_path, text)
    assert problems == (
        f"{path}: server.max_connections: expected an integer, got string '10'",
        f"{path}: routes[0].timeouts.respnse: unknown key (known: connect, response, idle, total,"
        " send, client_body); did you mean 'response'?",
        f"{path}: routes[1].upstream: scheme must be http or https, got 'ftp'",
    )


def test_three_mistakes_reported_together(tmp_path: Path) -> None:
    text = '[pool]\nidle_timeout = -1\n[server]\nlisten = "::1:80"\n' + ROUTE + "name = 7\n"
    problems = problems_of(tmp_path, text)
    assert len(problems) == 3
    path = str(tmp_path / "proxycore.toml")
    assert all(p.startswith(path + ": ") for p in problems)
    keys = {p.removeprefix(path + ": ").split(":")[0] for p in problems}
    assert keys == {"pool.idle_timeout", "server.listen", "routes[0].name"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "rout = 1\n" + ROUTE,
            "rout: unknown key (known: server, timeouts, pool, inbound, admin, tunnel, state, "
            "routes); "
            "did you mean 'routes'?",
        ),
        (
            "[server]\nmax_conections = 5\n" + ROUTE,
            "server.max_conections: unknown key (known: "
            "listen, max_connections, max_header_bytes, max_header_count, header_timeout, "
            "keepalive_timeout, allow_public, shutdown_grace, workers, trusted_proxies, "
            "session_key_file); "
            "did you mean 'max_connections'?",
        ),
        (
            "[timeouts]\nconect = 5\n" + ROUTE,
            "timeouts.conect: unknown key (known: connect, "
            "response, idle, total, send, client_body); did you mean 'connect'?",
        ),
        (
            "[pool]\nzzz = 5\n" + ROUTE,
            "pool.zzz: unknown key (known: max_idle_per_origin, idle_timeout)",
        ),
        (
            ROUTE + "upstrem = 'x'\n",
            "routes[0].upstrem: unknown key (known: prefix, upstream, "
            "strip_prefix, preserve_host, accept_encoding, ca_file, timeouts, inject, name, "
            "inbound, deny_git_push, methods, deny_paths, max_body_bytes, rate_limit, websocket, "
            "ws, sse, allow_encoded_slashes, merge_slashes, upstreams, balance, hash_on, retry, "
            "health_check, outlier, affinity, max_retry_body_bytes); "
            "did you mean 'upstream'?",
        ),
        (ROUTE + "target = 'x'\n", "routes[0].target: unknown key"),
        (
            ROUTE + "inject = { token_env = 'A', token = 'sk-x' }\n",
            "routes[0].inject.token: unknown key (known: header, scheme, token_env, token_file)",
        ),
    ],
)
def test_unknown_keys(tmp_path: Path, text: str, expected: str) -> None:
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{tmp_path / 'proxycore.toml'}: {expected}"), problems


def test_unknown_key_without_close_match_has_no_suggestion(tmp_path: Path) -> None:
    (problem,) = problems_of(tmp_path, "[pool]\nzzz = 5\n" + ROUTE)
    assert problem.endswith("pool.zzz: unknown key (known: max_idle_per_origin, idle_timeout)")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[server]\nmax_connections = true\n" + ROUTE,
            "server.max_connections: expected an integer, got boolean true",
        ),
        (
            "[server]\nmax_header_bytes = 1000\n" + ROUTE,
            "server.max_header_bytes: must be >= 1024, got 1000",
        ),
        (
            "[server]\nlisten = 'h:70000'\n" + ROUTE,
            "server.listen: port must be between 0 and 65535",
        ),
        ("[server]\nlisten = ['h:1', 'h:x']\n" + ROUTE, "server.listen[1]: port must be between"),
        ("[timeouts]\nconnect = 0\n" + ROUTE, "timeouts.connect: must be > 0, got 0"),
        (
            "[timeouts]\nresponse = 'long'\n" + ROUTE,
            "timeouts.response: expected a number, got string 'long'",
        ),
        ("[timeouts]\nidle = inf\n" + ROUTE, "timeouts.idle: must be a finite number, got inf"),
        ("[timeouts]\ntotal = -1\n" + ROUTE, "timeouts.total: must be >= 0, got -1"),
        (
            "[pool]\nmax_idle_per_origin = 1.5\n" + ROUTE,
            "pool.max_idle_per_origin: expected an integer, got float 1.5",
        ),
        ("server = 5\n" + ROUTE, "server: expected a table, got integer 5"),
        ("timeouts = [1]\n" + ROUTE, "timeouts: expected a table, got an array"),
        ("routes = 1\n", "routes: expected an array of tables, got integer 1"),
        ("[routes]\nprefix = '/'\n", "routes: expected an array of tables, got a table"),
        ("routes = [1]\n", "routes[0]: expected a table, got integer 1"),
        ("", "routes: at least one [[routes]] table is required"),
        ("routes = []\n", "routes: at least one [[routes]] table is required"),
        ("[[routes]]\nupstream = 'http://h/'\n", "routes[0].prefix: required key is missing"),
        (
            "[[routes]]\nprefix = '/'\n",
            "routes[0].upstream: exactly one of upstream or upstreams must be set",
        ),
        (
            ROUTE + "strip_prefix = 'true'\n",
            "routes[0].strip_prefix: expected a boolean, got string 'true'",
        ),
        (
            ROUTE + "accept_encoding = 'gzip'\n",
            "routes[0].accept_encoding: must be 'passthrough' or 'identity', got 'gzip'",
        ),
        (ROUTE + "timeouts = 5\n", "routes[0].timeouts: expected a table, got integer 5"),
        (
            ROUTE + "timeouts = { connect = -2 }\n",
            "routes[0].timeouts.connect: must be > 0, got -2",
        ),
        (ROUTE + "inject = 'Bearer'\n", "routes[0].inject: expected a table"),
        (
            ROUTE + "inject = { header = 'x-api-key' }\n",
            "routes[0].inject.token_env: exactly one of token_env or token_file must be set",
        ),
        (
            '[[routes]]\nprefix = "v1/"\nupstream = "http://h/"\n',
            "routes[0].prefix: must start with '/', got 'v1/'",
        ),
        (
            '[[routes]]\nprefix = "/a/%2E./"\nupstream = "http://h/"\n',
            "routes[0].prefix: must not contain '.' or '..' segments",
        ),
    ],
)
def test_toml_value_errors(tmp_path: Path, text: str, expected: str) -> None:
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{tmp_path / 'proxycore.toml'}: {expected}"), problems


def test_missing_prefix_and_bad_upstream_both_reported(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "[[routes]]\nupstream = 'ftp://h/'\nname = 1\n")
    keys = [p.split(": ")[1] for p in problems]
    assert keys == ["routes[0].prefix", "routes[0].upstream", "routes[0].name"]


def test_problems_in_nested_and_route_fields_all_reported(tmp_path: Path) -> None:
    text = ROUTE + "timeouts = { idle = 0, bogus = 1 }\ninject = {}\npreserve_host = 1\n"
    problems = problems_of(tmp_path, text)
    keys = sorted(p.split(": ")[1] for p in problems)
    assert keys == [
        "routes[0].inject.token_env",
        "routes[0].preserve_host",
        "routes[0].timeouts.bogus",
        "routes[0].timeouts.idle",
    ]


def test_bad_global_timeouts_not_repeated_per_route(tmp_path: Path) -> None:
    text = "[timeouts]\nconnect = -1\n" + ROUTE + "timeouts = { response = 1 }\n"
    assert [p.split(": ")[1] for p in problems_of(tmp_path, text)] == ["timeouts.connect"]


def test_duplicate_prefixes_in_toml(tmp_path: Path) -> None:
    text = (
        '[[routes]]\nprefix = "/api"\nupstream = "http://a/"\n'
        '[[routes]]\nprefix = "/other/"\nupstream = "http://b/"\n'
        '[[routes]]\nprefix = "/api/"\nupstream = "http://c/"\n'
    )
    assert problems_of(tmp_path, text) == (
        f"{tmp_path / 'proxycore.toml'}: routes[2].prefix: duplicate of routes[0] ('/api/')",
    )


def test_toml_syntax_error(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "[server]\nlisten = \n")
    assert len(problems) == 1
    assert problems[0].startswith(f"{tmp_path / 'proxycore.toml'}: invalid TOML: ")
    assert "line 2, column" in problems[0]


def test_toml_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "proxycore.toml"
    path.write_bytes(b'name = "\xff"\n')
    with pytest.raises(ConfigError, match="invalid TOML: file is not valid UTF-8"):
        Config.from_toml(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        Config.from_toml(path)
    assert info.value.problems == (f"{path}: cannot read config: No such file or directory",)


def test_unreadable_file_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Config.load(tmp_path)
    assert info.value.problems == (f"{tmp_path}: cannot read config: Is a directory",)


def test_ca_file_relative_to_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    (conf_dir / "ca.pem").write_text("dummy")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    text = '[[routes]]\nprefix = "/"\nupstream = "https://h/"\nca_file = "ca.pem"\n'
    (route,) = Config.from_toml(write(conf_dir, text)).routes
    assert route.ca_file == str(conf_dir / "ca.pem")


def test_ca_file_relative_path_from_relative_config_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "ca.pem").write_text("dummy")
    write(
        tmp_path / "conf", '[[routes]]\nprefix = "/"\nupstream = "https://h/"\nca_file = "ca.pem"\n'
    )
    monkeypatch.chdir(tmp_path)
    (route,) = Config.from_toml("conf/proxycore.toml").routes
    assert route.ca_file == str(tmp_path / "conf" / "ca.pem")
    assert os.path.isabs(route.ca_file)


def test_ca_file_absolute_path_kept(tmp_path: Path) -> None:
    ca = tmp_path / "abs.pem"
    ca.write_text("dummy")
    text = f'[[routes]]\nprefix = "/"\nupstream = "https://h/"\nca_file = "{ca}"\n'
    (route,) = Config.from_toml(write(tmp_path / ".." / tmp_path.name, text)).routes
    assert route.ca_file == str(ca)


def test_ca_file_missing_or_unreadable(tmp_path: Path) -> None:
    (tmp_path / "dir.pem").mkdir()
    text = (
        '[[routes]]\nprefix = "/a/"\nupstream = "https://h/"\nca_file = "missing.pem"\n'
        '[[routes]]\nprefix = "/b/"\nupstream = "https://h/"\nca_file = "dir.pem"\n'
    )
    problems = problems_of(tmp_path, text)
    path = tmp_path / "proxycore.toml"
    assert problems == (
        f"{path}: routes[0].ca_file: cannot read {str(tmp_path / 'missing.pem')!r}: "
        "No such file or directory",
        f"{path}: routes[1].ca_file: cannot read {str(tmp_path / 'dir.pem')!r}: Is a directory",
    )


def test_ca_file_on_http_upstream_reports_both(tmp_path: Path) -> None:
    text = ROUTE + 'ca_file = "missing.pem"\n'
    problems = problems_of(tmp_path, text)
    assert [p.split(": ")[1] for p in problems] == ["routes[0].ca_file", "routes[0].ca_file"]
    assert "cannot read" in problems[0]
    assert "only allowed for https upstreams" in problems[1]


def test_toml_secrets_not_echoed(tmp_path: Path) -> None:
    text = (
        '[[routes]]\nprefix = "/"\nupstream = "https://u:sk-SECRETVAL@h/"\n'
        'inject = { scheme = "Bearer sk-SECRETVAL", token_env = "sk-SECRETVAL", token = "x" }\n'
    )
    problems = problems_of(tmp_path, text)
    assert len(problems) == 4
    assert all("SECRETVAL" not in p for p in problems)


# --------------------------------------------------------------------------- from_mapping / load


def test_from_mapping_in_code() -> None:
    config = Config.from_mapping(
        {"routes": [{"prefix": "/v1/", "upstream": "http://h/"}], "pool": {"idle_timeout": 5}}
    )
    assert config.routes[0].target.host == "h"
    assert config.pool.idle_timeout == 5.0
    assert config.source == "<config>"


def test_from_mapping_errors_use_source() -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_mapping({"routes": [{"prefix": "x", "upstream": "http://h/"}]}, source="app")
    assert info.value.problems == ("app: routes[0].prefix: must start with '/', got 'x'",)
    with pytest.raises(ConfigError) as info:
        Config.from_mapping({})
    assert info.value.problems == ("<config>: routes: at least one [[routes]] table is required",)


def test_from_mapping_non_mapping() -> None:
    with pytest.raises(ConfigError, match="<config>: expected a table at the top level"):
        Config.from_mapping(["x"])  # type: ignore[arg-type]


def test_from_mapping_accepts_tuple_of_routes() -> None:
    config = Config.from_mapping({"routes": ({"prefix": "/", "upstream": "http://h/"},)})
    assert len(config.routes) == 1


@pytest.mark.parametrize("name", ["proxycore.toml", "proxycore.conf", "config"])
def test_load_dispatches_to_toml(tmp_path: Path, name: str) -> None:
    assert Config.load(write(tmp_path, ROUTE, name)).routes[0].prefix == "/v1/"


@pytest.mark.parametrize("name", ["routes.json", "ROUTES.JSON"])
def test_load_dispatches_to_legacy_json(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, json.dumps({"routes": [LEGACY_ROUTE]}), name)
    config = Config.load(str(path))
    assert config.routes[0].accept_encoding == "identity"
    assert config.source == str(path)


# --------------------------------------------------------------------------- legacy JSON


def test_legacy_happy_path(tmp_path: Path) -> None:
    second = {
        "path": "/gh/",
        "upstream": "http://10.0.0.5:8080/api/",
        "auth_scheme": "token",
        "token_env": "GH_TOKEN",
    }
    path = write(tmp_path, json.dumps({"routes": [LEGACY_ROUTE, second]}), "routes.json")
    config = Config.from_legacy_json(path)
    assert config.source == str(path)
    assert config.server == ServerSettings()
    assert config.timeouts == Timeouts()
    assert config.pool == PoolSettings()
    anthropic, gh = config.routes
    assert anthropic == Route(
        prefix="/anthropic/",
        upstream="https://api.anthropic.com",
        strip_prefix=True,
        accept_encoding="identity",
        inject=Inject(header="Authorization", scheme="Bearer", token_env="ANTHROPIC_API_KEY"),
        name="/anthropic/",
        deny_git_push=True,  # the legacy sidecar refused git push on every route
    )
    assert anthropic.preserve_host is False
    assert anthropic.ca_file is None
    assert anthropic.timeouts is None
    assert anthropic.target == Upstream("https", "api.anthropic.com", 443, "/")
    assert gh.inject == Inject(scheme="token", token_env="GH_TOKEN")
    assert gh.target.host_header == "10.0.0.5:8080"


def test_legacy_empty_auth_scheme_means_bare_token(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps({"routes": [{**LEGACY_ROUTE, "auth_scheme": ""}]}), "r.json")
    assert Config.from_legacy_json(path).routes[0].inject == Inject(token_env="ANTHROPIC_API_KEY")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"path": "anthropic/"}, "routes[2].path: must start and end with '/'"),
        ({"path": "/anthropic"}, "routes[2].path: must start and end with '/'"),
        ({"path": "/a/../"}, "routes[2].path: must not contain '.' or '..' segments"),
        ({"path": 5}, "routes[2].path: expected a string, got integer 5"),
        ({"upstream": "ftp://h"}, "routes[2].upstream: scheme must be http or https, got 'ftp'"),
        ({"upstream": "api.anthropic.com"}, "routes[2].upstream: must be an absolute URL"),
        ({"upstream": None}, "routes[2].upstream: expected a string, got NoneType"),
        ({"auth_scheme": None}, "routes[2].auth_scheme: required key is missing"),
        ({"token_env": None}, "routes[2].token_env: required key is missing"),
        ({"path": None}, "routes[2].path: required key is missing"),
        ({"upstream": None, "_drop": True}, "routes[2].upstream: required key is missing"),
        ({"auth_scheme": ["Bearer"]}, "routes[2].auth_scheme: expected a string, got an array"),
        ({"auth_scheme": "Bearer token"}, "routes[2].auth_scheme: must be a single token"),
        ({"token_env": 1}, "routes[2].token_env: expected a string, got integer"),
        ({"token_env": "sk-ant-x"}, "routes[2].token_env: must be the name of an environment"),
        (
            {"tokenenv": "X"},
            "routes[2].tokenenv: unknown key (known: path, upstream, "
            "auth_scheme, token_env); did you mean 'token_env'?",
        ),
    ],
)
def test_legacy_route_errors(tmp_path: Path, change: dict[str, Any], expected: str) -> None:
    entry: dict[str, Any] = {**LEGACY_ROUTE, "path": "/third/"}
    drop = change.pop("_drop", False)
    for key, value in change.items():
        if value is None and (key != "upstream" or drop):
            entry.pop(key)
        else:
            entry[key] = value
    data = {"routes": [LEGACY_ROUTE, {**LEGACY_ROUTE, "path": "/second/"}, entry]}
    problems = legacy_problems(tmp_path, data)
    assert len(problems) == 1, problems
    assert problems[0] == f"{tmp_path / 'routes.json'}: {expected}" or problems[0].startswith(
        f"{tmp_path / 'routes.json'}: {expected}"
    ), problems


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"routes": [LEGACY_ROUTE], "version": 1}, "version: unknown key (known: routes)"),
        ({}, "routes: expected a non-empty array of routes, got NoneType"),
        ({"routes": []}, "routes: expected a non-empty array of routes, got an array"),
        ({"routes": {"a": 1}}, "routes: expected a non-empty array of routes, got a table"),
        ({"routes": [5]}, "routes[0]: expected a JSON object, got integer 5"),
        ([LEGACY_ROUTE], "expected a JSON object, got an array"),
        (
            {"routes": [LEGACY_ROUTE, {**LEGACY_ROUTE, "path": "/x/"}, LEGACY_ROUTE]},
            "routes[2].path: duplicate of routes[0] ('/anthropic/')",
        ),
    ],
)
def test_legacy_file_errors(tmp_path: Path, data: Any, expected: str) -> None:
    assert legacy_problems(tmp_path, data) == (f"{tmp_path / 'routes.json'}: {expected}",)


def test_legacy_collects_all_problems(tmp_path: Path) -> None:
    data = {
        "routes": [
            {"path": "x", "upstream": "ftp://h", "auth_scheme": "Bearer", "token_env": "T"},
            {"upstream": "http://h", "auth_scheme": "Bearer", "token_env": "T", "extra": 1},
            {**LEGACY_ROUTE, "token_env": "not a name"},
        ]
    }
    problems = legacy_problems(tmp_path, data)
    prefix = f"{tmp_path / 'routes.json'}: "
    assert all(p.startswith(prefix) for p in problems)
    assert [p.removeprefix(prefix) for p in problems] == [
        "routes[0].path: must start and end with '/'",
        "routes[0].upstream: scheme must be http or https, got 'ftp'",
        "routes[1].extra: unknown key (known: path, upstream, auth_scheme, token_env)",
        "routes[1].path: required key is missing",
        "routes[2].token_env: must be the name of an environment variable, not the token itself",
    ]


def test_legacy_bad_json_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, '{\n  "routes": [\n    {"path": "/a/",}\n  ]\n}\n', "routes.json")
    with pytest.raises(ConfigError) as info:
        Config.from_legacy_json(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}: invalid JSON: ")
    assert "(line 3, column 20)" in problem


def test_legacy_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    with pytest.raises(ConfigError) as info:
        Config.load(path)
    assert info.value.problems == (f"{path}: cannot read config: No such file or directory",)


def test_legacy_bom_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"routes": [LEGACY_ROUTE]}).encode())
    assert len(Config.from_legacy_json(path).routes) == 1


def test_legacy_secret_values_not_echoed(tmp_path: Path) -> None:
    entry = {
        "path": "/a/",
        "upstream": "https://k:sk-SECRETVAL@h",
        "auth_scheme": "Bearer sk-SECRETVAL",
        "token_env": "sk-SECRETVAL",
    }
    problems = legacy_problems(tmp_path, {"routes": [entry]})
    assert len(problems) == 3
    assert all("SECRETVAL" not in p for p in problems)


@pytest.mark.parametrize("prefix", ["/a%2Fb/", "/a;x/", "/a//b/", "/a\\b/"])
def test_route_prefix_is_written_as_the_decision_path_sees_it(prefix: str) -> None:
    with pytest.raises(ConfigError, match="prefix: is matched against the normalized"):
        Route(prefix, "http://h/")


def test_route_normalization_options() -> None:
    route = Route("/", "http://h/", allow_encoded_slashes=True, merge_slashes=False)
    assert (route.allow_encoded_slashes, route.merge_slashes) == (True, False)
    with pytest.raises(ConfigError, match="merge_slashes"):
        Route("/", "http://h/", merge_slashes="no")  # type: ignore[arg-type]


def test_trusted_proxies(tmp_path: Path) -> None:
    path = tmp_path / "proxycore.toml"
    path.write_text(
        '[server]\ntrusted_proxies = ["10.0.0.0/8", "192.0.2.7", "fd00::/8"]\n'
        '[[routes]]\nprefix = "/"\nupstream = "http://h/"\n'
    )
    server = Config.from_toml(path).server
    assert [str(n) for n in server.trusted_networks] == ["10.0.0.0/8", "192.0.2.7/32", "fd00::/8"]
    path.write_text(
        '[server]\ntrusted_proxies = ["10.0.0.0/8", "nope"]\n'
        '[[routes]]\nprefix = "/"\nupstream = "http://h/"\n'
    )
    with pytest.raises(ConfigError) as info:
        Config.from_toml(path)
    assert f"{path}: server.trusted_proxies[1]: must be an IP address or CIDR" in str(info.value)


# --------------------------------------------------------------------------- issue 10 (4, 5)


def test_inbound_cache_anonymous_defaults_off_and_is_a_boolean(tmp_path: Path) -> None:
    from proxycore.config import Inbound

    assert Inbound().cache_anonymous is False
    assert Inbound(cache_anonymous=True).cache_anonymous is True
    with pytest.raises(ConfigError, match="cache_anonymous: expected a boolean"):
        Inbound(cache_anonymous=1)  # type: ignore[arg-type]
    path = write(tmp_path, "[inbound]\ncache_anonymous = true\n" + ROUTE)
    assert Config.from_toml(path).inbound.cache_anonymous is True
    problems = problems_of(tmp_path, '[inbound]\ncache_anonymous = "yes"\n' + ROUTE)
    toml = tmp_path / "proxycore.toml"
    assert problems == (f"{toml}: inbound.cache_anonymous: expected a boolean, got string 'yes'",)


def test_websocket_routes_accept_ws_and_wss_upstreams() -> None:
    ws = Route("/ws/", "ws://chat.internal:9000/socket/", websocket=True)
    assert ws.target == Upstream("http", "chat.internal", 9000, "/socket/")
    assert ws.upstream == "ws://chat.internal:9000/socket/"
    wss = Route("/wss/", "wss://chat.internal/", websocket=True, ca_file="/ca.pem")
    assert wss.target == Upstream("https", "chat.internal", 443, "/")
    assert Route("/p/", "ws://h/", websocket=True).target.port == 80
    with pytest.raises(ConfigError, match="ca_file: only allowed for https upstreams"):
        Route("/ws/", "ws://h/", websocket=True, ca_file="/ca.pem")


@pytest.mark.parametrize("upstream", ["ws://h/", "wss://h/", "WS://h/"])
def test_ws_upstreams_are_refused_on_http_routes(upstream: str) -> None:
    with pytest.raises(ConfigError) as info:
        Route("/a/", upstream)
    (problem,) = info.value.problems
    assert problem.startswith("upstream: scheme must be http or https, got 'ws")
    assert "only on websocket routes" in problem


def test_websocket_route_upstream_scheme_problems_name_file_and_key(tmp_path: Path) -> None:
    good = '[[routes]]\nprefix = "/ws/"\nupstream = "wss://h/"\nwebsocket = true\n'
    route = Config.from_toml(write(tmp_path, good)).routes[0]
    assert (route.target.scheme, route.target.port) == ("https", 443)
    bad = '[[routes]]\nprefix = "/ws/"\nupstream = "ftp://h/"\nwebsocket = true\n'
    problems = problems_of(tmp_path, bad)
    toml = tmp_path / "proxycore.toml"
    assert problems == (
        f"{toml}: routes[0].upstream: scheme must be http, https, ws or wss, got 'ftp'",
    )
    plain = '[[routes]]\nprefix = "/a/"\nupstream = "ws://h/"\n'
    assert problems_of(tmp_path, plain)[0].startswith(
        f"{toml}: routes[0].upstream: scheme must be http or https, got 'ws'"
    )
