"""Secrets: injected upstream tokens and the inbound bearer secret, all failing closed.

* :class:`TokenSource`: an upstream token from an env var or a file (re-read when it changes).
* :class:`InboundSecrets`: the file of secrets callers present as ``Authorization: Bearer``,
  one per line (current + previous), compared in constant time, re-read on rotation, refusing
  everything while unusable. :func:`parse_bearer` extracts the presented token.
* :func:`generate_secret` writes a secret file that is 0600 from creation (temp file + atomic
  rename); :func:`check_secret` describes one without showing it.

Secret values never appear in an exception message, a log line or a repr. Pure stdlib (no trio):
files are small and read again only when their stat signature changes.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import re
import secrets
import shlex
import stat

MIN_SECRET_LENGTH = 24
_MAX_FILE_BYTES = 64 * 1024
#: A byte a bearer token can't hold: controls, space, DEL.
_NOT_TOKEN = re.compile(rb"[\x00-\x20\x7f]")
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
_log = logging.getLogger("proxycore.secrets")

# (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns): any rewrite, rename or touch changes it.
_Signature = tuple[int, int, int, int, int]


class SecretError(Exception):
    """A secret is unusable; the message names the env var or file and what to do, never a value."""


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _stat_signature(path: str) -> _Signature | None:
    try:
        return _signature(os.stat(path))
    except OSError:
        return None


def _bad_header_bytes(value: bytes) -> bool:
    """True if ``value`` holds a byte not allowed in a header value (CR, LF, NUL, controls)."""
    return any(b < 0x20 or b == 0x7F for b in value)


def _read_small_file(path: str) -> tuple[bytes, os.stat_result]:
    """Read a regular file of at most 64 KiB, or OSError. Opened non-blocking so a FIFO cannot
    hang the proxy; the signature is the ``fstat`` of what was read, so later changes are seen."""
    fd = os.open(path, _READ_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file")
        data = b""
        while len(data) <= _MAX_FILE_BYTES and (chunk := os.read(fd, _MAX_FILE_BYTES + 1)):
            data += chunk
    finally:
        os.close(fd)
    if len(data) > _MAX_FILE_BYTES:
        raise OSError(0, f"larger than {_MAX_FILE_BYTES} bytes")
    return data, st


# --------------------------------------------------------------------------- upstream tokens


class TokenSource:
    """Where an injected upstream token comes from: exactly one of env / file."""

    __slots__ = ("_env", "_file", "_loaded", "_problem", "_sig", "_token", "label")

    def __init__(self, *, env: str | None = None, file: str | None = None) -> None:
        if (env is None) == (file is None) or not (env or file):
            raise ValueError("TokenSource needs exactly one non-empty env= or file=")
        self._env, self._file, self._loaded, self._problem = env, file, False, ""
        self.label = f"environment variable {env}" if env is not None else f"token file {file}"
        self._token: bytes | None = None
        self._sig: _Signature | None = None

    def load(self) -> None:
        """(Re)read now: at start and on reload. A missing/empty value is remembered as missing
        (``get`` raises later); not an error here. Surrounding whitespace is stripped."""
        self._loaded = True
        self._token, self._sig = None, None  # never cache a failed read: retry on every get()
        sig: _Signature | None = None
        if self._env is not None:
            value = os.environ.get(self._env)
            if value is None:
                self._problem = f"token not available: {self.label} is not set"
                return
            token = os.fsencode(value).strip()
        else:
            try:
                raw, st = _read_small_file(str(self._file))
            except OSError as exc:
                reason = f" ({exc.strerror})" if exc.strerror else ""
                self._problem = (
                    f"token not available: {self.label} is missing or unreadable{reason}"
                )
                return
            token, sig = raw.strip(), _signature(st)
        if not token:
            self._problem = f"token not available: {self.label} is empty"
        elif _bad_header_bytes(token):
            self._problem = f"token in {self.label} contains characters not allowed in a header"
        else:
            self._token, self._sig = token, sig

    def get(self) -> bytes:
        """The token for a request; re-reads a token file whose stat signature changed (one
        ``os.stat`` per call). Raises :class:`SecretError` while the token is unavailable."""
        file = self._file
        if not self._loaded or (file and (self._sig is None or _stat_signature(file) != self._sig)):
            self.load()
        if self._token is None:
            raise SecretError(self._problem)
        return self._token

    def __repr__(self) -> str:
        return f"TokenSource({self.label}, token=***)"


# --------------------------------------------------------------------------- inbound secret


def _generate_hint(path: str, *, force: bool = False) -> str:
    extra = " --force" if force else ""
    return f"`proxycore secret generate --out {shlex.quote(path)}{extra}`"


def _parse_secrets(path: str, data: bytes) -> tuple[list[bytes], list[str]]:
    """Secrets in file order, and problems (by line number; never a value)."""
    found: list[bytes] = []
    problems: list[str] = []
    hint = _generate_hint(path, force=True)
    for number, line in enumerate(data.splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith(b"#"):
            continue
        if _bad_header_bytes(entry) or any(b in b" \t" for b in entry):
            problems.append(
                f"line {number}: the secret contains whitespace or control characters, "
                "which a Bearer header cannot carry"
            )
        elif len(entry) < MIN_SECRET_LENGTH:
            problems.append(
                f"line {number}: the secret is {len(entry)} characters, fewer than the minimum "
                f"{MIN_SECRET_LENGTH}; replace it with one from {hint}"
            )
        found.append(entry)
    if not found and not problems:
        problems.append(f"empty (no secret in it); create one with {hint}")
    return found, problems


def _read_error(path: str, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return f"missing; create one with {_generate_hint(path)}"
    return (
        f"unreadable ({exc.strerror or exc}); make it a regular file readable by the proxy's "
        f"user (chmod 600 {shlex.quote(path)})"
    )


def _mode_problems(path: str, st: os.stat_result) -> list[str]:
    mode = stat.S_IMODE(st.st_mode)
    quoted, problems = shlex.quote(path), []
    if mode & 0o066:
        what = "readable" if mode & 0o044 else "writable"
        problems.append(f"{what} by group or others (mode {mode:04o}); run chmod 600 {quoted}")
    euid = os.geteuid() if hasattr(os, "geteuid") else st.st_uid
    if st.st_uid != euid:
        problems.append(
            f"owned by uid {st.st_uid}, not the proxy's user; run chown {euid} {quoted}"
        )
    return problems


class InboundSecrets:
    """The inbound bearer secret file: one secret per non-empty line (current + previous for
    rotation). Fails closed: while the file is unusable, :meth:`match` refuses everything."""

    __slots__ = ("_healthy", "_problem", "_secrets", "_sig", "_warnings", "path")

    def __init__(self, path: str) -> None:
        self.path, self._healthy = path, False
        self._secrets: list[bytes] = []
        self._sig: _Signature | None = None
        self._problem: str | None = None  # the logged reason while failing closed
        self._warnings: list[str] = []

    def _read(self) -> tuple[list[bytes], os.stat_result]:
        """Read and validate; SecretError with every problem found."""
        try:
            data, st = _read_small_file(self.path)
        except OSError as exc:
            message = f"inbound secret file {self.path}: {_read_error(self.path, exc)}"
            raise SecretError(message) from None
        found, problems = _parse_secrets(self.path, data)
        if problems:
            raise SecretError(f"inbound secret file {self.path}: " + "; ".join(problems))
        return found, st

    def _warn_list(self, st: os.stat_result) -> list[str]:
        return [f"inbound secret file {self.path} is {p}" for p in _mode_problems(self.path, st)]

    def load_at_start(self) -> list[str]:
        """Read and validate for startup; SecretError (refuse to start) when the file is missing,
        unreadable, empty or holds a secret shorter than 24 characters. Returns warnings."""
        self._secrets, self._sig, self._healthy, self._problem = [], None, False, None
        found, st = self._read()
        self._secrets, self._sig, self._healthy = found, _signature(st), True
        self._warnings = self._warn_list(st)
        return list(self._warnings)

    def reload(self) -> None:
        """Re-read now (SIGHUP). On failure fail closed until a good read; logs state changes."""
        try:
            found, st = self._read()
        except SecretError as exc:
            self._secrets, self._sig, self._healthy = [], None, False
            if str(exc) != self._problem:
                _log.warning("%s; refusing every inbound request until it is fixed", exc)
            self._problem = str(exc)
            return
        if self._problem is not None:
            _log.warning("inbound secret file %s is usable again; accepting requests", self.path)
        warnings = self._warn_list(st)
        for warning in set(warnings) - set(self._warnings):
            _log.warning("%s", warning)
        self._secrets, self._sig, self._warnings = found, _signature(st), warnings
        self._healthy, self._problem = True, None

    def _refresh(self) -> None:
        """Re-read if the file changed (one ``os.stat``), or on every call while failing."""
        if not self._healthy or self._sig is None or _stat_signature(self.path) != self._sig:
            self.reload()

    def match(self, presented: bytes) -> int | None:
        """Index of the secret equal to ``presented`` (constant time, every secret compared), or
        None; None for everything while failing closed."""
        self._refresh()
        if not self._healthy:
            return None
        result: int | None = None
        for index, secret in enumerate(self._secrets):
            if hmac.compare_digest(presented, secret) and result is None:
                result = index
        return result

    @property
    def healthy(self) -> bool:
        """False while failing closed (the file is missing, unreadable or invalid)."""
        return self._healthy

    def __repr__(self) -> str:
        return f"InboundSecrets({self.path}, {len(self._secrets)} secrets=***)"


def parse_bearer(authorization: bytes | None) -> bytes | None:
    """``b"Bearer <token>"`` (scheme case-insensitive, one or more spaces, one non-empty field)
    -> the token; anything else -> None."""
    if authorization is None:
        return None
    scheme, sep, rest = authorization.strip(b" \t").partition(b" ")
    if not sep or scheme.lower() != b"bearer":
        return None
    token = rest.lstrip(b" ")
    if not token or _NOT_TOKEN.search(token) is not None:
        return None
    return token


# --------------------------------------------------------------------------- secret files


def generate_secret(out: str, *, force: bool = False) -> str:
    """Write a fresh secret to ``out``, mode 0600 from creation (temporary file in the same
    directory, fsync, atomic ``os.replace``, directory fsync). Refuses to overwrite an existing
    file unless ``force``. Returns the path written, never the secret."""
    if not force and os.path.lexists(out):
        raise SecretError(
            f"secret file {out} already exists; pass --force to replace it "
            "(callers using the old secret will be refused)"
        )
    directory = os.path.dirname(os.path.abspath(out))
    tmp = os.path.join(directory, f".{os.path.basename(out)}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    data, fd, created = (secrets.token_urlsafe(32) + "\n").encode("ascii"), -1, False
    try:
        fd = os.open(tmp, flags, 0o600)
        created = True
        os.fchmod(fd, 0o600)  # umask can only remove bits; make the mode exact anyway
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)  # unbuffered writes: nothing to flush before the fsync
        os.close(fd)
        fd = -1
        os.replace(tmp, out)
        created = False
    except OSError as exc:
        raise SecretError(
            f"cannot write secret file {out}: {exc.strerror or exc}; check that its directory "
            "exists and is writable"
        ) from None
    finally:
        if fd >= 0:
            os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    with contextlib.suppress(OSError):  # durability of the rename; the file is already in place
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return out


def check_secret(path: str) -> str:
    """A one-paragraph report on a secret file: count and lengths of secrets (never values), mode,
    owner, safety and problems. Raises SecretError if the file is missing or unreadable."""
    try:
        data, st = _read_small_file(path)
    except OSError as exc:
        raise SecretError(f"secret file {path}: {_read_error(path, exc)}") from None
    found, problems = _parse_secrets(path, data)
    mode, mode_problems = stat.S_IMODE(st.st_mode), _mode_problems(path, st)
    if mode not in (0o600, 0o400) and not mode & 0o066:
        mode_problems.append(f"mode {mode:04o} is unusual; run chmod 600 {shlex.quote(path)}")
    lengths = ", ".join(str(len(s)) for s in found) or "none"
    report = (
        f"Secret file {path}: {len(found)} secret{'' if len(found) == 1 else 's'} (lengths: "
        f"{lengths}; minimum {MIN_SECRET_LENGTH}); mode {mode:04o}, owner uid {st.st_uid}: "
        f"{'NOT safe' if mode_problems else 'safe'}."
    )
    problems += mode_problems
    return report + (f" Problems: {'; '.join(problems)}." if problems else " No problems found.")
