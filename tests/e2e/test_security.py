"""End-to-end admission: credential injection, identity stripping, inbound bearer auth,
safe binding, per-route policy and rate limits (see ``proxycore/security/admission.py``).

Real sockets on 127.0.0.1. Upstreams are ``echo_app`` under hypercorn where the headers the
upstream received matter, or raw sockets where connections must be counted. The clock is
the real one (``autojump_clock`` would jump while socket I/O is in flight): rate-limit
tests leave a wide margin between their requests and the next token.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import pytest
import trio

from proxycore import Config, ConfigError, Inject, Route, ServerSettings, serve
from proxycore.cli.commands import main as cli_main
from proxycore.config import Inbound, RateLimit
from proxycore.security.secrets import SecretError, generate_secret
from proxycore.tools.sim import ASGIApp, Receive, Scope, Send
from tests.apps import echo_app
from tests.helpers import http_request, read_until, start_app, start_raw_server

Headers = list[tuple[bytes, bytes]]
HeaderList = list[tuple[str, str]]

LOCAL: Final = ServerSettings(listen=("127.0.0.1:0",))
OK: Final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
TOKEN: Final = "tok-UPSTREAM-5ecret-0123456789"
IDENTITY: Final = "x-authenticated-user"


# --------------------------------------------------------------------------- helpers


async def start_config(nursery: trio.Nursery, config: Config) -> tuple[str, int]:
    """Run ``serve(config)`` in ``nursery``; the first bound address."""
    addresses: list[tuple[str, int]] = await nursery.start(serve, config)
    return addresses[0]


async def proxy_for(
    nursery: trio.Nursery,
    routes: Sequence[Route],
    *,
    inbound: Inbound | None = None,
    server: ServerSettings = LOCAL,
) -> tuple[str, int]:
    config = Config(routes=tuple(routes), server=server, inbound=inbound or Inbound())
    return await start_config(nursery, config)


async def echo_upstream(nursery: trio.Nursery) -> str:
    host, port = await start_app(nursery, echo_app)
    return f"http://{host}:{port}/"


def header(headers: Headers, name: bytes) -> bytes | None:
    values = [v for n, v in headers if n.lower() == name]
    return values[0] if values else None


def error_of(status: int, headers: Headers, body: bytes, expected: int) -> dict[str, str]:
    """A proxy-made JSON error with ``expected`` status: its ``error`` object."""
    assert status == expected, (status, body)
    assert header(headers, b"content-type") == b"application/json"
    error: dict[str, str] = json.loads(body)["error"]
    assert set(error) == {"type", "message", "request_id"}
    return error


def echoed(body: bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(body)
    return data


def values(echo: dict[str, Any], name: str) -> list[str]:
    """What the echo upstream received for ``name`` (exact lower-case spelling)."""
    return [v for n, v in echo["headers"] if n == name]


def normalized_names(echo: dict[str, Any]) -> list[str]:
    """Header names the upstream received, lower case with ``_`` read as ``-``."""
    return [n.lower().replace("_", "-") for n, _ in echo["headers"]]


async def get_echo(
    host: str, port: int, target: str, headers: HeaderList, method: str = "GET"
) -> dict[str, Any]:
    status, _, body = await http_request(host, port, method, target, headers)
    assert status == 200, body
    return echoed(body)


def bump_mtime(path: Path) -> None:
    """Make sure a rewrite is seen as a change whatever the file system's time granularity."""
    st = os.stat(path)
    later = st.st_mtime_ns + 5_000_000_000
    os.utime(path, ns=(later, later))


def write_secrets(path: Path, *lines: str) -> None:
    """Rewrite a secret file in place (it keeps mode 0600) and bump its mtime."""
    path.write_text("".join(f"{line}\n" for line in lines))
    os.chmod(path, 0o600)
    bump_mtime(path)


def new_secret_file(directory: Path) -> tuple[Path, str]:
    path = directory / "inbound.secret"
    generate_secret(str(path))
    return path, path.read_text().strip()


def bearer(secret: str) -> HeaderList:
    return [("Authorization", f"Bearer {secret}")]


def leaf(exc: BaseException) -> BaseException:
    """The single leaf of (possibly nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        assert len(exc.exceptions) == 1, exc
        exc = exc.exceptions[0]
    return exc


async def start_failure(config: Config) -> BaseException:
    """Start ``serve(config)``, expecting it to refuse: the (leaf) exception it raised."""
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(serve, config)
        except Exception as exc:
            return leaf(exc)
        nursery.cancel_scope.cancel()
    raise AssertionError("serve started although it should have refused")


async def _read_request(stream: trio.SocketStream, buf: bytearray) -> bytes | None:
    """One request head (and its Content-Length body) off ``stream``; None at EOF."""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buf += data
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end])
    del buf[:end]
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(buf) < length:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buf += data
    del buf[:length]
    return head


class OkUpstream:
    """Raw upstream answering ``200 ok`` to every request; counts connections and heads."""

    def __init__(self) -> None:
        self.connections = 0
        self.heads: list[bytes] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def start(self, nursery: trio.Nursery) -> OkUpstream:
        self.port = await start_raw_server(nursery, self._handle)
        return self

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buf = bytearray()
        while (head := await _read_request(stream, buf)) is not None:
            self.heads.append(head)
            await stream.send_all(OK)


# =========================================================================== injection


async def test_injected_credential_replaces_every_client_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PC_TEST_KEY", TOKEN)
    # One copy each (a second copy is a 400: test_request_view.py); every spelling is replaced.
    sent = [
        ("X_API_KEY", "stolen-4"),
        ("Authorization", "Bearer stolen-5"),
        ("Proxy-Authorization", "Basic stolen-7"),
        ("X-Keep", "kept"),
    ]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            upstream = await echo_upstream(nursery)
            inject = Inject(header="x-api-key", token_env="PC_TEST_KEY")
            host, port = await proxy_for(nursery, [Route("/api/", upstream, inject=inject)])
            echo = await get_echo(host, port, "/api/v1/messages", sent)
            nursery.cancel_scope.cancel()
    assert values(echo, "x-api-key") == [TOKEN]
    assert values(echo, "x-keep") == ["kept"]  # client headers do get through
    names = normalized_names(echo)
    assert names.count("x-api-key") == 1
    assert "authorization" not in names
    assert "proxy-authorization" not in names
    assert "stolen" not in json.dumps(echo["headers"])


async def test_legacy_route_table_injects_bearer_and_refuses_git_push(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PC_TEST_GH", TOKEN)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            upstream = (await echo_upstream(nursery)).rstrip("/")
            table = {
                "routes": [
                    {
                        "path": "/gh/",
                        "upstream": upstream,
                        "auth_scheme": "Bearer",
                        "token_env": "PC_TEST_GH",
                    }
                ]
            }
            routes_file = tmp_path / "routes.json"
            routes_file.write_text(json.dumps(table))
            config = Config.from_legacy_json(routes_file)
            config = dataclasses.replace(config, server=LOCAL)
            host, port = await start_config(nursery, config)

            client_headers = [("Authorization", "Bearer stolen"), ("Accept-Encoding", "gzip, br")]
            plain = await get_echo(host, port, "/gh/repos/o/r?per_page=5", client_headers)
            push_post = await http_request(host, port, "POST", "/gh/o/r.git/git-receive-pack")
            push_refs = await http_request(
                host, port, "GET", "/gh/o/r.git/info/refs?x=1&service=git-receive-pack"
            )
            fetch_refs = await get_echo(
                host, port, "/gh/o/r.git/info/refs?service=git-upload-pack", []
            )
            fetch_post = await get_echo(
                host, port, "/gh/o/r.git/git-upload-pack", [], method="POST"
            )
            nursery.cancel_scope.cancel()
    assert plain["path"] == "/repos/o/r"
    assert plain["query"] == "per_page=5"
    assert values(plain, "authorization") == [f"Bearer {TOKEN}"]
    assert values(plain, "accept-encoding") == ["identity"]
    for status, headers, body in (push_post, push_refs):
        assert error_of(status, headers, body, 403)["type"] == "git_push_denied"
    assert fetch_refs["path"] == "/o/r.git/info/refs"
    assert fetch_refs["query"] == "service=git-upload-pack"
    assert values(fetch_refs, "authorization") == [f"Bearer {TOKEN}"]
    assert fetch_post["method"] == "POST"
    assert fetch_post["path"] == "/o/r.git/git-upload-pack"


async def test_token_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first-token-value\n")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            upstream = await echo_upstream(nursery)
            inject = Inject(header="Authorization", scheme="token", token_file=str(token_file))
            host, port = await proxy_for(nursery, [Route("/", upstream, inject=inject)])
            before = await get_echo(host, port, "/x", [])
            token_file.write_text("second-token-value-longer\n")
            bump_mtime(token_file)
            after = await get_echo(host, port, "/x", [])
            nursery.cancel_scope.cancel()
    assert values(before, "authorization") == ["token first-token-value"]
    assert values(after, "authorization") == ["token second-token-value-longer"]


async def test_unset_token_is_500_naming_the_variable_in_the_log_only_and_no_token_leaks(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="proxycore")
    monkeypatch.setenv("PC_TEST_KEY", TOKEN)
    monkeypatch.delenv("PC_TEST_UNSET_KEY", raising=False)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            upstream = await echo_upstream(nursery)
            routes = [
                Route(
                    "/set/",
                    upstream,
                    inject=Inject(header="x-api-key", token_env="PC_TEST_KEY"),
                    deny_git_push=True,
                    methods=("GET", "POST"),
                ),
                Route(
                    "/unset/",
                    upstream,
                    inject=Inject(scheme="Bearer", token_env="PC_TEST_UNSET_KEY"),
                ),
            ]
            host, port = await proxy_for(nursery, routes)
            unset = await http_request(host, port, "GET", "/unset/x")
            ok = await http_request(host, port, "GET", "/set/x")
            errors = [
                unset,
                await http_request(host, port, "POST", "/set/r.git/git-receive-pack"),
                await http_request(host, port, "PUT", "/set/x"),
                await http_request(host, port, "GET", "/nowhere"),
            ]
            nursery.cancel_scope.cancel()
    error = error_of(*unset, 500)
    assert error["type"] == "internal_error"
    assert "PC_TEST_UNSET_KEY" not in error["message"]  # where tokens live is not the client's
    assert values(echoed(ok[2]), "x-api-key") == [TOKEN]  # the token really was in play
    assert [status for status, _, _ in errors] == [500, 403, 405, 404]
    for _, headers, body in errors:
        assert TOKEN.encode() not in body
        assert all(TOKEN.encode() not in v for _, v in headers)
    access = [r for r in caplog.records if r.name == "proxycore.access"]
    assert len(access) == 5
    assert "PC_TEST_UNSET_KEY" in access[0].getMessage()  # the operator's detail
    assert TOKEN not in caplog.text


@pytest.mark.parametrize(
    ("inject_header", "scheme", "connection"),
    [
        ("Authorization", "Bearer", "Authorization"),
        ("Authorization", "Bearer", "keep-alive, authorization"),
        ("x-api-key", None, "X-Api-Key, Authorization"),
    ],
)
async def test_connection_header_cannot_remove_injected_credential(
    monkeypatch: pytest.MonkeyPatch, inject_header: str, scheme: str | None, connection: str
) -> None:
    monkeypatch.setenv("PC_TEST_KEY", TOKEN)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            upstream = await echo_upstream(nursery)
            inject = Inject(header=inject_header, scheme=scheme, token_env="PC_TEST_KEY")
            host, port = await proxy_for(nursery, [Route("/", upstream, inject=inject)])
            echo = await get_echo(host, port, "/x", [("Connection", connection)])
            nursery.cancel_scope.cancel()
    expected = f"{scheme} {TOKEN}" if scheme else TOKEN
    assert values(echo, inject_header.lower()) == [expected]


# =========================================================================== identity


def _alice_auth_app() -> ASGIApp:
    """A forward-auth service that admits everyone as alice."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        headers = [(b"x-user-email", b"alice@example.com"), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    return app


async def test_connection_header_cannot_remove_forward_auth_identity() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            upstream = await echo_upstream(nursery)
            auth_host, auth_port = await start_app(nursery, _alice_auth_app())
            inbound = Inbound(
                mode="forward_auth",
                url=f"http://{auth_host}:{auth_port}/verify",
                identity_headers=(("X-User-Email", "X-Authenticated-User"),),
            )
            host, port = await proxy_for(nursery, [Route("/", upstream)], inbound=inbound)
            sent = [("Connection", "X-Authenticated-User"), ("X-Authenticated-User", "mallory")]
            echo = await get_echo(host, port, "/x", sent)
            nursery.cancel_scope.cancel()
    assert values(echo, IDENTITY) == ["alice@example.com"]
    assert normalized_names(echo).count(IDENTITY) == 1


async def test_spoofed_identity_headers_never_reach_an_open_route() -> None:
    spoofed = [
        ("X-Authenticated-User", "mallory-1"),
        ("x-authenticated-user", "mallory-2"),
        ("X_Authenticated_User", "mallory-3"),
        ("x_AUTHENTICATED_user", "mallory-4"),
        ("X-AUTHENTICATED-USER", "mallory-5"),
        ("X-Authenticated-User", "mallory-6"),  # duplicated
        ("X-Remote-User", "mallory-7"),  # a configured identity target
        ("x_remote_user", "mallory-8"),
        ("X-Remote-User", "mallory-9"),
        ("X-Other", "kept"),
    ]
    inbound = Inbound(identity_headers=(("X-User-Email", "X-Remote-User"),))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            upstream = await echo_upstream(nursery)
            host, port = await proxy_for(
                nursery, [Route("/", upstream, inbound="none")], inbound=inbound
            )
            echo = await get_echo(host, port, "/x", spoofed)
            nursery.cancel_scope.cancel()
    assert values(echo, "x-other") == ["kept"]
    names = normalized_names(echo)
    assert IDENTITY not in names
    assert "x-remote-user" not in names
    assert "mallory" not in json.dumps(echo["headers"])


# =========================================================================== bearer inbound


async def bearer_proxy(
    nursery: trio.Nursery, secret_file: Path, upstream: str, routes: Sequence[Route] = ()
) -> tuple[str, int]:
    inbound = Inbound(mode="bearer", secret_file=str(secret_file))
    return await proxy_for(nursery, routes or [Route("/", upstream)], inbound=inbound)


def assert_unauthorized(response: tuple[int, Headers, bytes], *secret: str) -> None:
    status, headers, body = response
    assert error_of(status, headers, body, 401)["type"] == "unauthorized"
    challenge = header(headers, b"www-authenticate")
    assert challenge is not None and challenge.startswith(b"Bearer"), challenge
    for s in secret:
        assert s.encode() not in body


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer wrong-secret-wrong-secret-wrong-secret",
        "Bearer {secret}x",
        "Bearer {short}",
        "Bearer {secret} extra",
        "Basic {secret}",
        "Token {secret}",
        "{secret}",
    ],
)
async def test_bearer_inbound_refuses_bad_credentials(
    tmp_path: Path, authorization: str | None
) -> None:
    secret_file, secret = new_secret_file(tmp_path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await OkUpstream().start(nursery)
            host, port = await bearer_proxy(nursery, secret_file, up.url)
            sent: HeaderList = []
            if authorization is not None:
                value = authorization.format(secret=secret, short=secret[:-1])
                sent.append(("Authorization", value))
            refused = await http_request(host, port, "GET", "/x", sent)
            assert up.connections == 0
            # The same connection set-up with the right secret passes: the refusal was the
            # credential, nothing else.
            good = await http_request(host, port, "GET", "/x", bearer(secret))
            nursery.cancel_scope.cancel()
    assert_unauthorized(refused, secret)
    assert good[0] == 200
    assert len(up.heads) == 1


@pytest.mark.parametrize("template", ["Bearer {secret}", "bearer {secret}", "BEARER   {secret}"])
async def test_bearer_inbound_admits_the_secret_and_never_forwards_it(
    tmp_path: Path, template: str
) -> None:
    secret_file, secret = new_secret_file(tmp_path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            upstream = await echo_upstream(nursery)
            host, port = await bearer_proxy(nursery, secret_file, upstream)
            sent = [("Authorization", template.format(secret=secret)), ("X-Keep", "kept")]
            echo = await get_echo(host, port, "/x", sent)
            nursery.cancel_scope.cancel()
    assert values(echo, "x-keep") == ["kept"]
    assert "authorization" not in normalized_names(echo)
    assert secret not in json.dumps(echo)


async def test_bearer_secret_rotation_without_restart(tmp_path: Path) -> None:
    secret_file, old = new_secret_file(tmp_path)
    new = secrets.token_urlsafe(32)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await OkUpstream().start(nursery)
            host, port = await bearer_proxy(nursery, secret_file, up.url)
            before = await http_request(host, port, "GET", "/x", bearer(old))
            write_secrets(secret_file, new)
            old_after = await http_request(host, port, "GET", "/x", bearer(old))
            new_after = await http_request(host, port, "GET", "/x", bearer(new))
            nursery.cancel_scope.cancel()
    assert before[0] == 200
    assert_unauthorized(old_after, old, new)
    assert new_after[0] == 200


async def test_bearer_two_line_file_accepts_current_and_previous(tmp_path: Path) -> None:
    secret_file, first = new_secret_file(tmp_path)
    current, previous = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await OkUpstream().start(nursery)
            host, port = await bearer_proxy(nursery, secret_file, up.url)
            write_secrets(secret_file, current, previous)
            got_current = await http_request(host, port, "GET", "/x", bearer(current))
            got_previous = await http_request(host, port, "GET", "/x", bearer(previous))
            got_first = await http_request(host, port, "GET", "/x", bearer(first))
            nursery.cancel_scope.cancel()
    assert got_current[0] == 200
    assert got_previous[0] == 200
    assert_unauthorized(got_first, first, current, previous)


async def test_bearer_secret_file_deleted_at_run_time_fails_closed(tmp_path: Path) -> None:
    secret_file, secret = new_secret_file(tmp_path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await OkUpstream().start(nursery)
            host, port = await bearer_proxy(nursery, secret_file, up.url)
            before = await http_request(host, port, "GET", "/x", bearer(secret))
            secret_file.unlink()
            after = [
                await http_request(host, port, "GET", "/x", bearer(secret)),
                await http_request(host, port, "GET", "/x", []),
                await http_request(host, port, "GET", "/x", [("Authorization", "Bearer")]),
            ]
            nursery.cancel_scope.cancel()
    assert before[0] == 200
    for response in after:
        assert_unauthorized(response, secret)
    assert len(up.heads) == 1


async def test_route_with_inbound_none_stays_open_while_others_need_bearer(
    tmp_path: Path,
) -> None:
    secret_file, secret = new_secret_file(tmp_path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await OkUpstream().start(nursery)
            routes = [Route("/open/", up.url, inbound="none"), Route("/closed/", up.url)]
            host, port = await bearer_proxy(nursery, secret_file, up.url, routes)
            open_anon = await http_request(host, port, "GET", "/open/x")
            closed_anon = await http_request(host, port, "GET", "/closed/x")
            closed_auth = await http_request(host, port, "GET", "/closed/x", bearer(secret))
            nursery.cancel_scope.cancel()
    assert open_anon[0] == 200
    assert_unauthorized(closed_anon)
    assert closed_auth[0] == 200
    assert [h.split(b" ")[1] for h in up.heads] == [b"/x", b"/x"]


@pytest.mark.parametrize(
    "content",
    [None, "", "\n\n", "# only a comment\n", "x" * 23 + "\n", "y" * 24 + "\n" + "z" * 23 + "\n"],
    ids=["missing", "empty", "blank-lines", "comment-only", "23-chars", "one-short-line"],
)
async def test_serve_refuses_to_start_with_an_unusable_secret_file(
    tmp_path: Path, content: str | None
) -> None:
    secret_file = tmp_path / "inbound.secret"
    if content is not None:
        secret_file.write_text(content)
        secret_file.chmod(0o600)
    config = Config(
        routes=(Route("/", "http://127.0.0.1:9/"),),
        server=LOCAL,
        inbound=Inbound(mode="bearer", secret_file=str(secret_file)),
    )
    with trio.fail_after(10):
        exc = await start_failure(config)
    assert isinstance(exc, SecretError), repr(exc)
    assert str(secret_file) in str(exc)
    for line in (content or "").splitlines():
        if line and not line.startswith("#"):
            assert line not in str(exc)


async def test_serve_starts_with_a_24_char_secret(tmp_path: Path) -> None:
    secret_file = tmp_path / "inbound.secret"
    secret = "s" * 24
    write_secrets(secret_file, secret)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await OkUpstream().start(nursery)
            host, port = await bearer_proxy(nursery, secret_file, up.url)
            status, _, _ = await http_request(host, port, "GET", "/x", bearer(secret))
            nursery.cancel_scope.cancel()
    assert status == 200


# =========================================================================== secret CLI


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_secret_generate_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "inbound.secret"
    with umask(0):  # the mode must not depend on a restrictive umask
        assert cli_main(["secret", "generate", "--out", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    secret = out.read_text().strip()
    assert len(secret) >= 24
    assert out.read_text() == secret + "\n"
    generated = capsys.readouterr()
    assert secret not in generated.out + generated.err

    assert cli_main(["secret", "check", str(out)]) == 0
    report = capsys.readouterr()
    assert f"lengths: {len(secret)}" in report.out
    assert "mode 0600" in report.out
    assert secret not in report.out + report.err

    assert cli_main(["secret", "generate", "--out", str(out)]) != 0
    refused = capsys.readouterr()
    assert "--force" in refused.err
    assert out.read_text().strip() == secret  # untouched

    with umask(0):
        assert cli_main(["secret", "generate", "--out", str(out), "--force"]) == 0
    assert out.read_text().strip() != secret
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["inbound.secret"]  # no temp file left


# =========================================================================== safe binding


async def test_public_listen_without_auth_is_refused() -> None:
    config = Config(
        routes=(Route("/", "http://127.0.0.1:9/"),),
        server=ServerSettings(listen=("0.0.0.0:0",)),
    )
    with trio.fail_after(10):
        exc = await start_failure(config)
    assert isinstance(exc, ConfigError), repr(exc)
    assert "allow_public" in str(exc)


async def test_public_listen_with_one_open_route_among_bearer_routes_is_refused(
    tmp_path: Path,
) -> None:
    secret_file, _ = new_secret_file(tmp_path)
    config = Config(
        routes=(
            Route("/a/", "http://127.0.0.1:9/"),
            Route("/b/", "http://127.0.0.1:9/", inbound="none"),
        ),
        server=ServerSettings(listen=("0.0.0.0:0",)),
        inbound=Inbound(mode="bearer", secret_file=str(secret_file)),
    )
    with trio.fail_after(10):
        exc = await start_failure(config)
    assert isinstance(exc, ConfigError), repr(exc)
    assert "allow_public" in str(exc) and "/b/" in str(exc)


async def test_public_listen_with_allow_public_starts() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await OkUpstream().start(nursery)
            server = ServerSettings(listen=("0.0.0.0:0",), allow_public=True)
            bound_host, port = await proxy_for(nursery, [Route("/", up.url)], server=server)
            status, _, body = await http_request("127.0.0.1", port, "GET", "/x")
            nursery.cancel_scope.cancel()
    assert bound_host == "0.0.0.0"
    assert (status, body) == (200, b"ok")


async def test_public_listen_with_bearer_starts(tmp_path: Path) -> None:
    secret_file, secret = new_secret_file(tmp_path)
    inbound = Inbound(mode="bearer", secret_file=str(secret_file))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await OkUpstream().start(nursery)
            server = ServerSettings(listen=("0.0.0.0:0",))
            _, port = await proxy_for(nursery, [Route("/", up.url)], inbound=inbound, server=server)
            anon = await http_request("127.0.0.1", port, "GET", "/x")
            authed = await http_request("127.0.0.1", port, "GET", "/x", bearer(secret))
            nursery.cancel_scope.cancel()
    assert_unauthorized(anon)
    assert authed[0] == 200


# =========================================================================== policy


async def test_methods_allow_list_is_405_with_allow() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await OkUpstream().start(nursery)
            host, port = await proxy_for(nursery, [Route("/", up.url, methods=("GET",))])
            post = await http_request(host, port, "POST", "/x", body=b"data")
            delete = await http_request(host, port, "DELETE", "/x")
            get = await http_request(host, port, "GET", "/x")
            head = await http_request(host, port, "HEAD", "/x")
            nursery.cancel_scope.cancel()
    for response in (post, delete):
        status, headers, body = response
        assert error_of(status, headers, body, 405)["type"] == "method_not_allowed"
        assert header(headers, b"allow") == b"GET, HEAD"
    assert get[0] == 200 and head[0] == 200
    assert [h.split(b" ")[0] for h in up.heads] == [b"GET", b"HEAD"]


async def test_deny_paths_glob() -> None:
    denied_targets = ["/admin/x", "/admin/x/y", "/adm%69n/x", "/admin/x?q=1"]
    allowed_targets = ["/administrator", "/admin", "/x/admin/y"]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await OkUpstream().start(nursery)
            route = Route("/", up.url, deny_paths=("/admin/*",))
            host, port = await proxy_for(nursery, [route])
            denied = [await http_request(host, port, "GET", t) for t in denied_targets]
            allowed = [await http_request(host, port, "GET", t) for t in allowed_targets]
            nursery.cancel_scope.cancel()
    for (status, headers, body), target in zip(denied, denied_targets, strict=True):
        assert error_of(status, headers, body, 403)["type"] == "forbidden", target
    assert [status for status, _, _ in allowed] == [200] * len(allowed_targets)
    assert len(up.heads) == len(allowed_targets)


async def test_content_length_over_max_body_is_413_without_upstream() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await OkUpstream().start(nursery)
            host, port = await proxy_for(nursery, [Route("/", up.url, max_body_bytes=10)])
            too_big = await http_request(host, port, "POST", "/x", body=b"x" * 11)
            assert up.connections == 0  # refused on the head's Content-Length alone
            fits = await http_request(host, port, "POST", "/x", body=b"x" * 10)
            assert up.connections == 1
            chunked_big = await http_request(
                host, port, "POST", "/x", [("Transfer-Encoding", "chunked")], body=b"x" * 11
            )
            nursery.cancel_scope.cancel()
    for status, headers, body in (too_big, chunked_big):
        assert error_of(status, headers, body, 413)["type"] == "payload_too_large"
        assert header(headers, b"connection") == b"close"
    assert fits[0] == 200


class HoldingUpstream:
    """Raw upstream that never answers: records what one connection received and its end."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.connections = 0
        self.got_head = trio.Event()
        self.closed = trio.Event()

    async def start(self, nursery: trio.Nursery) -> str:
        port = await start_raw_server(nursery, self._handle)
        return f"http://127.0.0.1:{port}/"

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            while data := await stream.receive_some(65536):
                self.received += data
                if b"\r\n\r\n" in self.received:
                    self.got_head.set()
        finally:
            self.closed.set()


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    got = bytearray()
    try:
        while data := await stream.receive_some(65536):
            got += data
    except trio.BrokenResourceError:
        pass
    return bytes(got)


async def test_chunked_upload_growing_past_max_body_is_413_and_upstream_cut() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = HoldingUpstream()
            url = await up.start(nursery)
            host, port = await proxy_for(nursery, [Route("/", url, max_body_bytes=10)])
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(
                    b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n"
                )
                await up.got_head.wait()
                await stream.send_all(b"6\r\nworld!\r\n0\r\n\r\n")
                reply = await read_to_eof(stream)
            await up.closed.wait()
            nursery.cancel_scope.cancel()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), reply
    assert b"\r\nConnection: close" in head
    assert json.loads(body)["error"]["type"] == "payload_too_large"
    assert up.connections == 1
    assert up.received.startswith(b"POST /up HTTP/1.1\r\n")
    assert b"world" not in up.received
    assert not up.received.endswith(b"0\r\n\r\n")


# =========================================================================== rate limits


async def test_rate_limit_per_client_ip() -> None:
    """burst 2, 1 token a second: two requests pass, a third at once is 429 (Retry-After),
    one more passes a second later and the next at once is 429 again (each burst takes
    milliseconds, far less than the second a token takes)."""
    limit = RateLimit(requests_per_second=1, burst=2, key="client_ip")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await OkUpstream().start(nursery)
            host, port = await proxy_for(nursery, [Route("/", up.url, rate_limit=limit)])
            first = [await http_request(host, port, "GET", "/x") for _ in range(2)]
            limited = await http_request(host, port, "GET", "/x")
            assert len(up.heads) == 2
            await trio.sleep(1)
            later = await http_request(host, port, "GET", "/x")
            again = await http_request(host, port, "GET", "/x")
            nursery.cancel_scope.cancel()
    assert [status for status, _, _ in first] == [200, 200]
    status, headers, body = limited
    assert error_of(status, headers, body, 429)["type"] == "too_many_requests"
    retry = header(headers, b"retry-after")
    assert retry is not None and int(retry) >= 1
    assert later[0] == 200
    assert again[0] == 429


SSE_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class StreamUpstream:
    """Raw SSE upstream: each response sends one event; the first then waits for ``release``."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.heads: list[bytes] = []

    async def start(self, nursery: trio.Nursery) -> str:
        port = await start_raw_server(nursery, self._handle)
        return f"http://127.0.0.1:{port}/"

    async def _handle(self, stream: trio.SocketStream) -> None:
        buf = bytearray()
        while (head := await _read_request(stream, buf)) is not None:
            self.heads.append(head)
            await stream.send_all(SSE_HEAD + chunk(b"data: first\n\n"))
            if len(self.heads) == 1:
                await self.release.wait()
            await stream.send_all(chunk(b"data: last\n\n") + b"0\r\n\r\n")


async def test_max_concurrent_streams() -> None:
    limit = RateLimit(requests_per_second=1000, burst=1000, max_concurrent_streams=1)
    request = b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = StreamUpstream()
            url = await up.start(nursery)
            host, port = await proxy_for(nursery, [Route("/", url, rate_limit=limit)])
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(request)
                opened = await read_until(stream, b"data: first\n\n")
                second = await http_request(host, port, "GET", "/events")
                up.release.set()
                ended = await read_until(stream, b"\r\n0\r\n\r\n")
                # The next request on this connection starts after the first exchange ended.
                await stream.send_all(request)
                third = await read_until(stream, b"\r\n0\r\n\r\n")
            nursery.cancel_scope.cancel()
    assert opened.startswith(b"HTTP/1.1 200 ")
    status, headers, body = second
    assert error_of(status, headers, body, 429)["type"] == "too_many_requests"
    assert header(headers, b"retry-after") == b"1"
    assert b"data: last" in ended
    assert third.startswith(b"HTTP/1.1 200 ")
    assert len(up.heads) == 2


async def test_bearer_rate_limit_buckets_are_per_secret(tmp_path: Path) -> None:
    """One bucket per secret (a token every 10 s: none comes back during the test)."""
    secret_file, _ = new_secret_file(tmp_path)
    one, two = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    write_secrets(secret_file, one, two)
    limit = RateLimit(requests_per_second=0.1, burst=1, key="bearer")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await OkUpstream().start(nursery)
            routes = [Route("/", up.url, rate_limit=limit)]
            host, port = await bearer_proxy(nursery, secret_file, up.url, routes)
            one_first = await http_request(host, port, "GET", "/x", bearer(one))
            one_second = await http_request(host, port, "GET", "/x", bearer(one))
            two_first = await http_request(host, port, "GET", "/x", bearer(two))
            two_second = await http_request(host, port, "GET", "/x", bearer(two))
            nursery.cancel_scope.cancel()
    assert one_first[0] == 200
    assert one_second[0] == 429
    assert two_first[0] == 200
    assert two_second[0] == 429
