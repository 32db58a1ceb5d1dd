"""``[state]`` validation: every problem named with the file and key path; the Redis URL's
password never appears in an error or a repr. No Redis needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxycore.config import Config, ConfigError, StateSettings

ROUTE = '[[routes]]\nprefix = "/"\nupstream = "http://127.0.0.1:9/"\n'


def load(tmp_path: Path, state: str) -> Config:
    path = tmp_path / "proxy.toml"
    path.write_text(f"[state]\n{state}\n\n{ROUTE}", encoding="utf-8")
    return Config.load(path)


def problems(tmp_path: Path, state: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, state)
    return list(caught.value.problems)


def test_unset_is_local_and_a_url_loads(tmp_path: Path) -> None:
    assert not Config().state.enabled
    config = load(tmp_path, 'redis = "redis://:pw@127.0.0.1:6379/0"\non_unavailable = "closed"')
    state = config.state
    assert state.enabled and state.redis == ("redis://:pw@127.0.0.1:6379/0",)
    assert (state.on_unavailable, state.timeout, state.key_prefix) == ("closed", 0.05, "proxycore:")
    assert "pw" not in repr(state) and "***" in repr(state)
    assert "pw" not in repr(config)


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ('redis = "http://127.0.0.1/"', "state.redis: scheme must be redis, rediss or sentinel"),
        ('redis = "redis://:0/"', "state.redis: needs a host"),
        ("redis = 5", "state.redis: expected a URL string or an array of sentinel URLs"),
        (
            'redis = ["redis://a:1", "redis://b:2"]',
            "state.redis: a list is for sentinel://host:port URLs",
        ),
        (
            'redis = ["sentinel://a:26379", "sentinel://b:26379"]',
            "state.sentinel_service: required with sentinel URLs",
        ),
        ('redis = "redis://h:6379"\non_unavailable = "open"', "state.on_unavailable: must be"),
        ('redis = "redis://h:6379"\ntimeout = 0', "state.timeout: must be > 0, got 0"),
        ('redis = "redis://h:6379"\ntimeout = 9', "state.timeout: must be at most 5 s"),
        ('redis = "redis://h:6379"\nlease = 0.1', "state.lease: must be at least 0.3 s"),
        ('redis = "redis://h:6379"\nsession_ttl = -1', "state.session_ttl: must be > 0"),
        ('redis = "redis://h:6379"\nkey_prefix = "a b"', "state.key_prefix: must be at most 64"),
        (
            'redis = "redis://h:6379"\nrelay_listen = "127.0.0.1:7070"',
            "state.relay_secret_file: required with relay_listen",
        ),
        ('relay_listen = "nowhere"\nrelay_secret_file = "s"', "state.relay_listen: expected"),
        ('redis = "redis://h:6379"\nleases = 3', "state.leases: unknown key"),
    ],
)
def test_each_problem_names_the_file_and_key(tmp_path: Path, state: str, expected: str) -> None:
    found = problems(tmp_path, state)
    source = str(tmp_path / "proxy.toml")
    assert any(p.startswith(f"{source}: {expected}") for p in found), found


def test_the_password_never_shows_in_a_problem(tmp_path: Path) -> None:
    found = problems(tmp_path, 'redis = "ftp://user:s3cret@h:1/"')
    assert found and all("s3cret" not in p for p in found)
    found = problems(tmp_path, 'redis = "redis://user:s3cret@h:0/"')
    assert found and all("s3cret" not in p for p in found)
    with pytest.raises(ConfigError) as caught:
        StateSettings(redis=("redis://user:s3cret@[zz/",))
    assert "s3cret" not in str(caught.value)


def test_relay_secret_file_resolves_against_the_config_directory(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        'redis = "redis://h:6379"\nrelay_listen = "127.0.0.1:0"\nrelay_secret_file = "relay"',
    )
    assert config.state.relay_secret_file == str(tmp_path / "relay")
