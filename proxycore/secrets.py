"""Secrets: injected upstream tokens and the inbound bearer secret, all failing closed.

* :class:`TokenSource` holds where an upstream token comes from (an environment variable or a
  file) and returns it per request, re-reading a file when it changes.
* :class:`InboundSecrets` holds the secret file that callers of the proxy must present as
  ``Authorization: Bearer <secret>``: one secret per line (current + previous for rotation),
  compared in constant time, re-read on rotation, and refusing everything while unusable.
* :func:`generate_secret` writes a new secret file that is mode 0600 from creation (temporary file
  + atomic rename); :func:`check_secret` describes one without showing it.

Secret values never appear in an exception message, a log line or a repr. Pure stdlib (no trio):
file reads are small and happen only when a file's stat signature changes.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import secrets
import shlex
import stat

MIN_SECRET_LENGTH = 24
_MAX_FILE_BYTES = 64 * 1024
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
_log = logging.getLogger("proxycore.secrets")

# (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns): any rewrite, rename or touch changes it.
_Signature = tuple[int, int, int, int, int]


class SecretError(Exception):
    """A secret is unusable; the message names the env var or file and what to do, never a value."""


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _bad_header_bytes(value: bytes) -> bool:
    """True if ``value`` holds a byte not allowed in a header value (CR, LF, NUL, controls)."""
    return any(b < 0x20 or b == 0x7F for b in value)


def _read_small_file(path: str) -> tuple[bytes, os.stat_result]:
    """Read a regular file of at most 64 KiB, or OSError. Opened non-blocking so a FIFO cannot
    hang the proxy; the signature is the ``fstat`` of what was read, so later changes are seen."""
    with os.fdopen(os.open(path, _READ_FLAGS), "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file")
        data = f.read(_MAX_FILE_BYTES + 1)
    if len(data) > _MAX_FILE_BYTES:
        raise OSError(0, f"larger than {_MAX_FILE_BYTES} bytes")
    return data, st


# --------------------------------------------------------------------------- upstream tokens


class TokenSource:
    """Where an injected upstream token comes from: exactly one of env / file."""

    __slots__ = ("_env", "_file", "_loaded", "_problem", "_sig", "_token", "label")

    def __init__(self, *, env: str | None = None, file: str | None = None) -> None:
        if (env is None) == (file is None):
            raise ValueError("TokenSource needs exactly one of env= or file=")
        self._env = env
        self._file = file
        self.label = f"environment variable {env}" if env is not None else f"token file {file}"
        self._token: bytes | None = None
        self._problem = ""
        self._sig: _Signature | None = None
        self._loaded = False

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
        if not self._loaded:
            self.load()
        elif self._file is not None:
            try:
                sig: _Signature | None = _signature(os.stat(self._file))
            except OSError:
                sig = None
            if sig is None or sig != self._sig:
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
                f"{MIN_SECRET_LENGTH}; replace it with one from {_generate_hint(path, force=True)}"
            )
        found.append(entry)
    if not found and not problems:
        problems.append(
            f"empty (no secret in it); create one with {_generate_hint(path, force=True)}"
        )
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
    quoted = shlex.quote(path)
    problems: list[str] = []
    if mode & 0o044:
        problems.append(f"readable by group or others (mode {mode:04o}); run chmod 600 {quoted}")
    elif mode & 0o022:
        problems.append(f"writable by group or others (mode {mode:04o}); run chmod 600 {quoted}")
    euid = os.geteuid() if hasattr(os, "geteuid") else st.st_uid
    if st.st_uid != euid:
        problems.append(
            f"owned by uid {st.st_uid}, not by the proxy's user (uid {euid}); "
            f"run chown {euid} {quoted}"
        )
    return problems


class InboundSecrets:
    """The inbound bearer secret file: one secret per non-empty line (current + previous for
    rotation). Fails closed: while the file is unusable, :meth:`match` refuses everything."""

    __slots__ = ("_healthy", "_problem", "_secrets", "_sig", "_warnings", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        self._secrets: list[bytes] = []
        self._sig: _Signature | None = None
        self._healthy = False
        self._problem: str | None = None
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
        try:
            sig = _signature(os.stat(self.path))
        except OSError:
            sig = None
        if sig is None or sig != self._sig or not self._healthy:
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
    if not token or any(b <= 0x20 or b == 0x7F for b in token):
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
    created = False
    try:
        fd = os.open(tmp, flags, 0o600)
        created = True
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, 0o600)  # umask can only remove bits; make the mode exact anyway
            f.write((secrets.token_urlsafe(32) + "\n").encode("ascii"))
            f.flush()
            os.fsync(fd)
        os.replace(tmp, out)
        created = False
    except OSError as exc:
        raise SecretError(
            f"cannot write secret file {out}: {exc.strerror or exc}; check that its directory "
            "exists and is writable"
        ) from None
    finally:
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
    mode = stat.S_IMODE(st.st_mode)
    mode_problems = _mode_problems(path, st)
    if mode not in (0o600, 0o400) and not mode & 0o066:
        mode_problems.append(f"mode {mode:04o} is unusual; run chmod 600 {shlex.quote(path)}")
    safe = not mode_problems
    problems += mode_problems
    lengths = ", ".join(str(len(s)) for s in found) or "none"
    noun = "secret" if len(found) == 1 else "secrets"
    report = (
        f"Secret file {path}: {len(found)} {noun} (lengths: {lengths}; minimum "
        f"{MIN_SECRET_LENGTH}); mode {mode:04o}, owner uid {st.st_uid}: "
        f"{'safe' if safe else 'NOT safe'}."
    )
    if problems:
        return report + " Problems: " + "; ".join(problems) + "."
    return report + " No problems found."
