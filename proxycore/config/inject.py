"""Credential injection settings (pure): which header carries the token and where the
token comes from (an environment variable or a file; read at runtime, never here)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config.checks import ENV_NAME_RE, TOKEN_RE, Problems, typed

__all__ = ["Inject"]


@dataclass(frozen=True, slots=True)
class Inject:
    """Credential injection: send ``header: [scheme ]<token>`` with the token read (elsewhere, at
    runtime) from environment variable ``token_env`` or from file ``token_file``."""

    header: str = "Authorization"
    scheme: str | None = None
    token_env: str | None = None
    token_file: str | None = None

    def __post_init__(self) -> None:
        p = Problems()  # values are never echoed: a misplaced token must not leak into logs
        header = typed(p, self, "header", str, show=False)
        if header is not None and not TOKEN_RE.fullmatch(header):
            p.add("header", "must be a valid HTTP header name")
        scheme = typed(p, self, "scheme", str, optional=True, show=False)
        if scheme is not None and not TOKEN_RE.fullmatch(scheme):
            p.add("scheme", "must be a single token such as 'Bearer' (no spaces)")
        env = typed(p, self, "token_env", str, optional=True, show=False)
        if env is not None and not ENV_NAME_RE.fullmatch(env):
            p.add("token_env", "must be the name of an environment variable, not the token itself")
        path = typed(p, self, "token_file", str, optional=True, show=False)
        if path is not None and (not path or "\0" in path):
            p.add("token_file", "must be a non-empty file path")
        if (self.token_env is None) == (self.token_file is None):
            p.add("token_env", "exactly one of token_env or token_file must be set")
        p.check()
