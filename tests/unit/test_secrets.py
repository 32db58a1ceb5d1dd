"""proxycore.security.secrets: token sources, the inbound bearer secret file, generate and check."""

from __future__ import annotations

import hmac
import logging
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxycore.security.secrets import (
    MIN_SECRET_LENGTH,
    InboundSecrets,
    SecretError,
    TokenSource,
    check_secret,
    generate_secret,
    parse_bearer,
)

SECRET_A = "A" * 20 + "secret-alpha-000000"  # 39 characters
SECRET_B = "B" * 20 + "secret-bravo-111111"
SECRET_C = "C" * 20 + "secret-charlie-2222"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def write(path: Path, text: str, mode: int = 0o600, bump: int = 0) -> Path:
    """Write ``text`` to ``path`` with ``mode``; ``bump`` seconds moves the mtime forward."""
    path.write_text(text)
    path.chmod(mode)
    if bump:
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump * 1_000_000_000))
    return path


def count_calls(monkeypatch: pytest.MonkeyPatch, *names: str) -> list[str]:
    """Replace ``os.<name>`` for each name with a wrapper that records the call's name."""
    calls: list[str] = []

    def wrap(name: str) -> Callable[..., Any]:
        real = getattr(os, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return real(*args, **kwargs)

        return wrapper

    for name in names:
        monkeypatch.setattr(os, name, wrap(name))
    return calls


def is_healthy(inbound: InboundSecrets) -> bool:
    """``inbound.healthy`` read through a call, so mypy does not narrow it between reads."""
    return inbound.healthy


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    return write(tmp_path / "inbound", f"{SECRET_A}\n")


def make_unreadable(path: Path) -> None:
    """Something that exists at ``path`` but cannot be read as a file, even as root."""
    if IS_ROOT:
        path.mkdir()
    else:
        write(path, f"{SECRET_A}\n", mode=0o000)


# --------------------------------------------------------------------------- TokenSource, env


def test_token_env_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PC_TEST_TOKEN", "  tok-123\n")
    source = TokenSource(env="PC_TEST_TOKEN")
    assert source.label == "environment variable PC_TEST_TOKEN"
    source.load()
    assert source.get() == b"tok-123"


def test_token_env_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PC_TEST_TOKEN", raising=False)
    source = TokenSource(env="PC_TEST_TOKEN")
    source.load()  # not an error at load time
    with pytest.raises(SecretError) as info:
        source.get()
    assert str(info.value) == "token not available: environment variable PC_TEST_TOKEN is not set"


def test_token_env_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PC_TEST_TOKEN", "   ")
    source = TokenSource(env="PC_TEST_TOKEN")
    source.load()
    with pytest.raises(SecretError, match="PC_TEST_TOKEN is empty"):
        source.get()


def test_token_env_changes_only_on_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PC_TEST_TOKEN", "old-token")
    source = TokenSource(env="PC_TEST_TOKEN")
    source.load()
    monkeypatch.setenv("PC_TEST_TOKEN", "new-token")
    assert source.get() == b"old-token"
    source.load()
    assert source.get() == b"new-token"
    monkeypatch.delenv("PC_TEST_TOKEN")
    assert source.get() == b"new-token"
    source.load()
    with pytest.raises(SecretError, match="is not set"):
        source.get()


def test_token_get_before_load_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PC_TEST_TOKEN", "tok")
    assert TokenSource(env="PC_TEST_TOKEN").get() == b"tok"


@pytest.mark.parametrize("bad", ["abc\r\nX-Evil: 1", "abc\ndef", "a\x7fb", "a\x1bb"])
def test_token_env_header_injection_refused(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("PC_TEST_TOKEN", bad)
    source = TokenSource(env="PC_TEST_TOKEN")
    source.load()
    with pytest.raises(SecretError) as info:
        source.get()
    message = str(info.value)
    assert message == (
        "token in environment variable PC_TEST_TOKEN contains characters not allowed in a header"
    )
    assert "abc" not in message and "Evil" not in message


@pytest.mark.parametrize("kwargs", [{}, {"env": "A", "file": "/b"}, {"env": ""}, {"file": ""}])
def test_token_source_needs_exactly_one(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        TokenSource(**kwargs)


# --------------------------------------------------------------------------- TokenSource, file


def test_token_file_read_and_strip(tmp_path: Path) -> None:
    path = write(tmp_path / "gh", "\n  ghp_token-value \r\n\n")
    source = TokenSource(file=str(path))
    assert source.label == f"token file {path}"
    source.load()
    assert source.get() == b"ghp_token-value"


def test_token_file_reread_on_change(tmp_path: Path) -> None:
    path = write(tmp_path / "gh", "first-token\n")
    source = TokenSource(file=str(path))
    source.load()
    assert source.get() == b"first-token"
    write(path, "second-token-longer\n", bump=5)
    assert source.get() == b"second-token-longer"  # no load(): noticed by stat
    write(path, "third-tokenxxxxxxxxx\n", bump=10)  # same size, newer mtime
    assert source.get() == b"third-tokenxxxxxxxxx"


def test_token_file_one_stat_per_get_and_no_reread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "gh", "tok\n")
    source = TokenSource(file=str(path))
    source.load()
    calls = count_calls(monkeypatch, "stat", "open", "fstat")
    for _ in range(5):
        assert source.get() == b"tok"
    assert calls == ["stat"] * 5


def test_token_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope"
    source = TokenSource(file=str(path))
    source.load()
    with pytest.raises(SecretError) as info:
        source.get()
    assert str(info.value).startswith(
        f"token not available: token file {path} is missing or unreadable"
    )


def test_token_file_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "gh"
    make_unreadable(path)
    source = TokenSource(file=str(path))
    with pytest.raises(SecretError, match="is missing or unreadable"):
        source.get()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_unreadable_file_does_not_leak_descriptors(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    source = TokenSource(file=str(tmp_path / "dir"))
    inbound = InboundSecrets(str(tmp_path / "dir"))
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        with pytest.raises(SecretError, match="not a regular file"):
            source.get()
        assert inbound.match(SECRET_A.encode()) is None
    assert len(os.listdir("/proc/self/fd")) == before


def test_token_file_too_large(tmp_path: Path) -> None:
    path = write(tmp_path / "gh", "x" * (64 * 1024 + 1))
    with pytest.raises(SecretError, match="larger than 65536 bytes"):
        TokenSource(file=str(path)).get()
    path.write_text("y" * (64 * 1024))
    assert TokenSource(file=str(path)).get() == b"y" * (64 * 1024)


def test_token_file_empty(tmp_path: Path) -> None:
    path = write(tmp_path / "gh", " \n\n")
    source = TokenSource(file=str(path))
    source.load()
    with pytest.raises(SecretError, match=f"token file {re.escape(str(path))} is empty"):
        source.get()


@pytest.mark.parametrize("bad", ["abc\r\nX-Evil: 1", "abc\x00Evil", "abc\nEvil", "abc\rEvil"])
def test_token_file_crlf_inside_refused(tmp_path: Path, bad: str) -> None:
    path = write(tmp_path / "gh", f"{bad}\n")
    source = TokenSource(file=str(path))
    source.load()
    with pytest.raises(SecretError, match="contains characters not allowed in a header") as info:
        source.get()
    assert "abc" not in str(info.value) and "Evil" not in str(info.value)


def test_token_file_failure_not_cached(tmp_path: Path) -> None:
    """A failed read is retried on the next get(); a deleted file stops the old token."""
    path = tmp_path / "gh"
    source = TokenSource(file=str(path))
    source.load()
    with pytest.raises(SecretError):
        source.get()
    write(path, "now-here\n")
    assert source.get() == b"now-here"
    path.unlink()
    with pytest.raises(SecretError) as info:
        source.get()
    assert "now-here" not in str(info.value)
    write(path, "back-again\n")
    assert source.get() == b"back-again"


def test_token_repr_hides_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PC_TEST_TOKEN", "super-secret-value")
    env_source = TokenSource(env="PC_TEST_TOKEN")
    env_source.load()
    file_source = TokenSource(file=str(write(tmp_path / "gh", "super-secret-value\n")))
    file_source.load()
    for source in (env_source, file_source):
        assert source.get() == b"super-secret-value"
        text = repr(source)
        assert "***" in text and source.label in text and "super-secret" not in text
        assert "super-secret" not in str(source)


# --------------------------------------------------------------------------- InboundSecrets, start


def test_inbound_missing(tmp_path: Path) -> None:
    path = tmp_path / "inbound"
    with pytest.raises(SecretError) as info:
        InboundSecrets(str(path)).load_at_start()
    assert str(info.value) == (
        f"inbound secret file {path}: missing; create one with "
        f"`proxycore secret generate --out {path}`"
    )


def test_inbound_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match="missing"):
        InboundSecrets(str(tmp_path / "no-dir" / "inbound")).load_at_start()


def test_inbound_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "inbound"
    make_unreadable(path)
    with pytest.raises(SecretError, match=f"inbound secret file {re.escape(str(path))}: unread"):
        InboundSecrets(str(path)).load_at_start()


@pytest.mark.parametrize("text", ["", "\n\n  \n", "# only a comment\n\n"])
def test_inbound_empty(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "inbound", text)
    with pytest.raises(SecretError, match=r"empty .*proxycore secret generate"):
        InboundSecrets(str(path)).load_at_start()


def test_inbound_too_short_refused(tmp_path: Path) -> None:
    short = "s" * (MIN_SECRET_LENGTH - 1)
    path = write(tmp_path / "inbound", f"{SECRET_A}\n{short}\n")
    with pytest.raises(SecretError) as info:
        InboundSecrets(str(path)).load_at_start()
    message = str(info.value)
    assert "line 2" in message and "23 characters" in message and "minimum 24" in message
    assert short not in message and SECRET_A not in message


def test_inbound_24_chars_accepted(tmp_path: Path) -> None:
    exact = "x" * MIN_SECRET_LENGTH
    inbound = InboundSecrets(str(write(tmp_path / "inbound", f"{exact}\n")))
    assert inbound.load_at_start() == []
    assert is_healthy(inbound)
    assert inbound.match(exact.encode()) == 0


def test_inbound_whitespace_inside_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "inbound", f"{SECRET_A} {SECRET_B}\n")
    with pytest.raises(SecretError, match=r"line 1: .*whitespace") as info:
        InboundSecrets(str(path)).load_at_start()
    assert SECRET_A not in str(info.value)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_inbound_group_readable_warns(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path / "inbound", f"{SECRET_A}\n", mode=mode)
    warnings = InboundSecrets(str(path)).load_at_start()
    assert warnings == [
        f"inbound secret file {path} is readable by group or others (mode {mode:04o}); "
        f"run chmod 600 {path}"
    ]


def test_inbound_other_writable_warns(tmp_path: Path) -> None:
    path = write(tmp_path / "inbound", f"{SECRET_A}\n", mode=0o602)
    (warning,) = InboundSecrets(str(path)).load_at_start()
    assert "writable by group or others (mode 0602)" in warning


def test_inbound_rotation_two_lines(tmp_path: Path) -> None:
    inbound = InboundSecrets(str(write(tmp_path / "inbound", f"{SECRET_A}\n{SECRET_B}\n")))
    assert inbound.load_at_start() == []
    assert inbound.match(SECRET_A.encode()) == 0
    assert inbound.match(SECRET_B.encode()) == 1
    assert inbound.match(SECRET_C.encode()) is None
    assert inbound.match(b"") is None
    assert inbound.match(SECRET_A.encode()[:-1]) is None


def test_inbound_comments_and_blank_lines(tmp_path: Path) -> None:
    text = f"# current\n\n   {SECRET_A}   \r\n\n# previous ({SECRET_C})\n\t{SECRET_B}\n"
    inbound = InboundSecrets(str(write(tmp_path / "inbound", text)))
    inbound.load_at_start()
    assert inbound.match(SECRET_A.encode()) == 0
    assert inbound.match(SECRET_B.encode()) == 1
    assert inbound.match(SECRET_C.encode()) is None
    assert inbound.match(f"# previous ({SECRET_C})".encode()) is None


# --------------------------------------------------------------------------- InboundSecrets, run


def test_inbound_rotation_without_restart(secret_file: Path) -> None:
    inbound = InboundSecrets(str(secret_file))
    inbound.load_at_start()
    assert inbound.match(SECRET_A.encode()) == 0
    write(secret_file, f"{SECRET_B}\n", bump=5)
    assert inbound.match(SECRET_A.encode()) is None
    assert inbound.match(SECRET_B.encode()) == 0
    write(secret_file, f"{SECRET_C}\n{SECRET_B}\n", bump=10)  # new current + previous
    assert inbound.match(SECRET_C.encode()) == 0
    assert inbound.match(SECRET_B.encode()) == 1


def test_inbound_rotation_by_atomic_replace(tmp_path: Path, secret_file: Path) -> None:
    """A same-size, same-mtime replacement (new inode) is noticed too."""
    inbound = InboundSecrets(str(secret_file))
    inbound.load_at_start()
    st = secret_file.stat()
    new = write(tmp_path / "new", f"{SECRET_B}\n")
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, secret_file)
    assert inbound.match(SECRET_B.encode()) == 0
    assert inbound.match(SECRET_A.encode()) is None


def test_inbound_one_stat_per_match(secret_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inbound = InboundSecrets(str(secret_file))
    inbound.load_at_start()
    calls = count_calls(monkeypatch, "stat", "open", "fstat")
    for _ in range(4):
        assert inbound.match(SECRET_A.encode()) == 0
    assert calls == ["stat"] * 4


def test_inbound_fail_closed_when_deleted_and_recover(
    secret_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inbound = InboundSecrets(str(secret_file))
    inbound.load_at_start()
    caplog.set_level(logging.INFO, logger="proxycore.secrets")
    secret_file.unlink()
    for presented in (SECRET_A, SECRET_B, "", "x" * 30, SECRET_A):
        assert inbound.match(presented.encode()) is None
    assert not is_healthy(inbound)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one per change of state, not one per request
    assert "missing" in warnings[0].getMessage() and str(secret_file) in warnings[0].getMessage()

    write(secret_file, f"{SECRET_A}\n")
    assert inbound.match(SECRET_A.encode()) == 0
    assert is_healthy(inbound)
    assert "usable again" in caplog.records[-1].getMessage()
    assert all(SECRET_A not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("broken", ["", "\n# nothing\n", "short-secret\n", "__unreadable__"])
def test_inbound_fail_closed_on_bad_rewrite(
    secret_file: Path, broken: str, caplog: pytest.LogCaptureFixture
) -> None:
    inbound = InboundSecrets(str(secret_file))
    inbound.load_at_start()
    if broken == "__unreadable__":
        secret_file.unlink()
        make_unreadable(secret_file)
    else:
        write(secret_file, broken, bump=5)
    assert inbound.match(SECRET_A.encode()) is None
    assert inbound.match(b"short-secret") is None
    assert not is_healthy(inbound)
    assert len(caplog.records) == 1
    assert "short-secret" not in caplog.text and SECRET_A not in caplog.text


def test_inbound_state_changes_each_logged_once(
    secret_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inbound = InboundSecrets(str(secret_file))
    inbound.load_at_start()
    secret_file.unlink()
    inbound.match(b"x")
    inbound.match(b"x")
    write(secret_file, "")
    inbound.match(b"x")
    inbound.match(b"x")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "missing" in messages[0] and "empty" in messages[1]


def test_inbound_reload_now(secret_file: Path) -> None:
    inbound = InboundSecrets(str(secret_file))
    inbound.load_at_start()
    secret_file.unlink()
    inbound.reload()
    assert not is_healthy(inbound)
    write(secret_file, f"{SECRET_B}\n")
    inbound.reload()
    assert is_healthy(inbound)
    assert inbound.match(SECRET_B.encode()) == 0


def test_inbound_reload_logs_new_mode_warning(
    secret_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inbound = InboundSecrets(str(secret_file))
    inbound.load_at_start()
    secret_file.chmod(0o644)
    inbound.reload()
    assert is_healthy(inbound)
    assert [r.getMessage() for r in caplog.records] == [
        f"inbound secret file {secret_file} is readable by group or others (mode 0644); "
        f"run chmod 600 {secret_file}"
    ]


def test_inbound_match_without_load_at_start(secret_file: Path) -> None:
    inbound = InboundSecrets(str(secret_file))
    assert not is_healthy(inbound)
    assert inbound.match(SECRET_A.encode()) == 0
    assert is_healthy(inbound)


def test_inbound_non_ascii_does_not_raise(secret_file: Path) -> None:
    inbound = InboundSecrets(str(secret_file))
    inbound.load_at_start()
    for presented in ("é" * 30, "秘密" * 20, "\x00\xff"):
        assert inbound.match(presented.encode("utf-8")) is None
    assert inbound.match(b"\xff\xfe" * 20) is None


def test_inbound_uses_compare_digest_on_every_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbound = InboundSecrets(
        str(write(tmp_path / "inbound", f"{SECRET_A}\n{SECRET_B}\n{SECRET_C}"))
    )
    inbound.load_at_start()
    calls: list[tuple[object, object]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert inbound.match(SECRET_A.encode()) == 0  # first one matches: no early exit
    assert len(calls) == 3
    assert all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls)
    assert {b for _, b in calls} == {SECRET_A.encode(), SECRET_B.encode(), SECRET_C.encode()}
    calls.clear()
    assert inbound.match(b"wrong" * 8) is None
    assert len(calls) == 3


def test_inbound_repr_hides_secrets(secret_file: Path) -> None:
    inbound = InboundSecrets(str(secret_file))
    inbound.load_at_start()
    assert SECRET_A not in repr(inbound) and "***" in repr(inbound)


# --------------------------------------------------------------------------- parse_bearer


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"Bearer abc123", b"abc123"),
        (b"bearer abc123", b"abc123"),
        (b"BEARER abc123", b"abc123"),
        (b"BeArEr abc123", b"abc123"),
        (b"Bearer    abc123", b"abc123"),
        (b"  Bearer abc123  ", b"abc123"),
        (b"Bearer a.b-c_d~e+f/g==", b"a.b-c_d~e+f/g=="),
        (None, None),
        (b"", None),
        (b"Bearer", None),
        (b"Bearer ", None),
        (b"Bearer    ", None),
        (b"Bearerabc123", None),
        (b"Bearer\tabc123", None),
        (b"Basic abc123", None),
        (b"Token abc123", None),
        (b"Bearer abc 123", None),
        (b"Bearer abc\t123", None),
        (b"Bearer abc\x00", None),
        (b"Bearer abc\x7f", None),
        (b"Bearer abc123, Basic x", None),
        (b"abc123", None),
        (b" Bearer", None),
    ],
)
def test_parse_bearer(header: bytes | None, expected: bytes | None) -> None:
    assert parse_bearer(header) == expected


# --------------------------------------------------------------------------- generate_secret


@pytest.fixture
def zero_umask() -> Iterator[None]:
    old = os.umask(0)  # a wrong creation mode would show unmasked
    try:
        yield
    finally:
        os.umask(old)


def test_generate_secret_mode_and_content(tmp_path: Path, zero_umask: None) -> None:
    out = tmp_path / "inbound"
    assert generate_secret(str(out)) == str(out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    content = out.read_text()
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}\n", content)
    assert sorted(os.listdir(tmp_path)) == ["inbound"]
    inbound = InboundSecrets(str(out))
    assert inbound.load_at_start() == []
    assert inbound.match(content.strip().encode()) == 0


def test_generate_secret_is_random(tmp_path: Path) -> None:
    generate_secret(str(tmp_path / "a"))
    generate_secret(str(tmp_path / "b"))
    assert (tmp_path / "a").read_text() != (tmp_path / "b").read_text()


def test_generate_secret_refuses_overwrite(tmp_path: Path) -> None:
    out = write(tmp_path / "inbound", "keep me\n", mode=0o644)
    with pytest.raises(SecretError, match=r"already exists.*--force"):
        generate_secret(str(out))
    assert out.read_text() == "keep me\n"
    assert sorted(os.listdir(tmp_path)) == ["inbound"]


def test_generate_secret_force(tmp_path: Path) -> None:
    out = write(tmp_path / "inbound", "old\n", mode=0o644)
    generate_secret(str(out), force=True)
    assert out.read_text() != "old\n" and len(out.read_text()) == 44
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["inbound"]


def test_generate_secret_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match="cannot write secret file"):
        generate_secret(str(tmp_path / "no-dir" / "inbound"))


def test_generate_secret_0600_at_every_moment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zero_umask: None
) -> None:
    directory = tmp_path / "secrets"
    directory.mkdir()
    out = directory / "inbound"
    seen: list[tuple[str, str, int]] = []  # (step, file, mode) for every file at every step
    calls: list[tuple[str, tuple[Any, ...]]] = []

    def scan(step: str) -> None:
        for name in os.listdir(directory):
            seen.append((step, name, stat.S_IMODE(os.lstat(directory / name).st_mode)))

    def spying(name: str) -> Callable[..., Any]:
        real = getattr(os, name)

        def spy(*args: Any, **kwargs: Any) -> Any:
            calls.append((name, args))
            scan(f"before {name}")
            try:
                return real(*args, **kwargs)
            finally:
                scan(f"after {name}")

        return spy

    for name in ("open", "fchmod", "fsync", "replace"):
        monkeypatch.setattr(os, name, spying(name))
    generate_secret(str(out))

    assert [name for name, _ in calls if name != "open"] == ["fchmod", "fsync", "replace", "fsync"]
    assert [entry for entry in seen if entry[2] != 0o600] == []
    assert {name for step, name, _ in seen if step == "after replace"} == {"inbound"}
    tmp_names = {name for step, name, _ in seen if step == "before replace"}
    assert len(tmp_names) == 1 and "inbound" not in tmp_names  # a 0600 temp file, same dir
    created = [args for name, args in calls if name == "open" and args[1] & os.O_CREAT]
    assert len(created) == 1
    path, flags, mode = created[0]
    assert os.path.dirname(path) == str(directory)
    assert flags & os.O_EXCL and flags & os.O_WRONLY and mode == 0o600
    assert os.listdir(directory) == ["inbound"]


@pytest.mark.parametrize("failing", ["replace", "fsync", "fchmod"])
def test_generate_secret_cleans_up_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, boom)
    out = tmp_path / "inbound"
    with pytest.raises(SecretError, match=r"cannot write secret file .*No space left"):
        generate_secret(str(out))
    assert os.listdir(tmp_path) == []


def test_generate_secret_force_failure_keeps_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = write(tmp_path / "inbound", f"{SECRET_A}\n")

    def boom(*args: Any, **kwargs: Any) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(SecretError):
        generate_secret(str(out), force=True)
    assert out.read_text() == f"{SECRET_A}\n"
    assert os.listdir(tmp_path) == ["inbound"]


# --------------------------------------------------------------------------- check_secret


def test_check_secret_safe(tmp_path: Path) -> None:
    path = write(tmp_path / "inbound", f"# rotation\n{SECRET_A}\n{'y' * 30}\n")
    report = check_secret(str(path))
    assert f"{path}: 2 secrets (lengths: 39, 30;" in report
    assert "mode 0600" in report and ": safe." in report and "No problems found." in report
    assert SECRET_A not in report and "y" * 30 not in report
    assert "\n" not in report


def test_check_secret_read_only_is_safe(tmp_path: Path) -> None:
    path = write(tmp_path / "inbound", f"{SECRET_A}\n", mode=0o400)
    report = check_secret(str(path))
    assert "1 secret (lengths: 39;" in report and "mode 0400" in report and ": safe." in report


def test_check_secret_flags_0644(tmp_path: Path) -> None:
    path = write(tmp_path / "inbound", f"{SECRET_A}\n", mode=0o644)
    report = check_secret(str(path))
    assert "mode 0644" in report and "NOT safe" in report
    assert f"readable by group or others (mode 0644); run chmod 600 {path}" in report
    assert SECRET_A not in report


def test_check_secret_flags_unusual_mode(tmp_path: Path) -> None:
    report = check_secret(str(write(tmp_path / "inbound", f"{SECRET_A}\n", mode=0o700)))
    assert "NOT safe" in report and "mode 0700 is unusual" in report


def test_check_secret_reports_short_and_empty(tmp_path: Path) -> None:
    report = check_secret(str(write(tmp_path / "inbound", "tooshort\n")))
    assert "(lengths: 8;" in report and "8 characters, fewer than the minimum 24" in report
    assert "tooshort" not in report
    empty = check_secret(str(write(tmp_path / "empty", "")))
    assert "0 secrets (lengths: none" in empty and "empty" in empty


def test_check_secret_missing_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match="missing"):
        check_secret(str(tmp_path / "nope"))
    make_unreadable(tmp_path / "bad")
    with pytest.raises(SecretError, match="unreadable"):
        check_secret(str(tmp_path / "bad"))


def _parse_bearer_reference(authorization: bytes | None) -> bytes | None:
    """parse_bearer as it was before its token check became a regex (the oracle)."""
    if authorization is None:
        return None
    scheme, sep, rest = authorization.strip(b" \t").partition(b" ")
    if not sep or scheme.lower() != b"bearer":
        return None
    token = rest.lstrip(b" ")
    if not token or any(b <= 0x20 or b == 0x7F for b in token):
        return None
    return token


@settings(max_examples=3000, deadline=None)
@given(
    st.sampled_from([b"Bearer ", b"bearer  ", b"BEARER\t", b"Basic ", b"Bearer", b" Bearer "]),
    st.binary(max_size=40)
    | st.lists(st.sampled_from(list(b"aZ9-._~+/= \t\x00\x1f\x7f\x80\xff")), max_size=20).map(bytes),
)
def test_parse_bearer_matches_the_bytewise_reference(prefix: bytes, token: bytes) -> None:
    value = prefix + token
    assert parse_bearer(value) == _parse_bearer_reference(value)
