"""``python -m bench.profiling.spy_categories RAW [TOTAL_US]``: fold py-spy's raw stacks
(``py-spy record --native --format raw``) into bench/README.md's CPU categories.

Each sample goes to the innermost frame that names a category (native socket and epoll
calls, h11 by the side that called it, trio scopes / scheduling, metrics, access log,
header work, routing and admission, proxycore's own files). ``epoll_wait`` samples are
idle and left out of the shares; with TOTAL_US (the measured CPU per request or event)
each share is also shown in microseconds.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from typing import Final

__all__ = ["category", "main"]

Frame = tuple[str, str, int]
IDLE: Final = "idle: epoll_wait"
_FRAME: Final = re.compile(r"^(.*) \((.*?):(\d+)\)$")
_SKIP_PREFIXES: Final = ("<frozen", "contextlib", "abc", "typing", "enum", "functools")


def _native(fn: str, file: str) -> str | None:
    if fn.startswith("select_epoll_poll"):
        return IDLE
    if fn.startswith("pyepoll_internal_ctl"):
        return "syscalls: epoll_ctl (trio's wait_readable/writable registration)"
    if fn.startswith("select_poll_poll"):
        return "syscalls: poll() liveness check of a pooled upstream connection"
    if "socketmodule.c" in file:
        return "syscalls: recv/send (+ socket glue)"
    return None


def _trio(fn: str, file: str) -> str:
    lowered = fn.lower()
    if "_run.py" in file and ("CancelScope" in fn or "cancel" in lowered or "deadline" in lowered):
        return "trio cancel scopes"
    if "nursery" in lowered or "spawn" in fn or "start_soon" in fn:
        return "trio nurseries/tasks"
    return "trio scheduling (run loop, checkpoints, wake-ups)"


def _ours(fn: str, file: str) -> str:
    if "observe/metrics.py" in file:
        return "metrics"
    if "observe/accesslog.py" in file:
        return "access log"
    if "net/stream.py" in file:
        return "syscalls: recv/send (+ socket glue)"
    if any(f"http/{m}.py" in file for m in ("headers", "request_head", "target")):
        return "header work (headers, target view, request head checks)"
    if "http/router.py" in file or "proxycore/security/" in file or fn == "admit":
        return "routing and admission"
    return "proxycore, the rest (" + file.rsplit("/", 1)[-1] + ")"


def category(frames: list[Frame]) -> str:
    """The category of one sample (``frames``: outermost first)."""
    for i in range(len(frames) - 1, -1, -1):
        fn, file, _ = frames[i]
        native = _native(fn, file)
        if native is not None:
            return native
        if file.endswith((".c", ".h")) or file.startswith("<attrs") or file == "<string>":
            continue
        if "_io_epoll" in file:
            if fn.endswith("get_events"):
                return IDLE
            return "syscalls: epoll_ctl (trio's wait_readable/writable registration)"
        if file.startswith("h11/"):
            upstream = any("response_head.py" in f[1] for f in frames[:i])
            return "h11, upstream side (response head)" if upstream else "h11, client side"
        if file.startswith("trio/"):
            return _trio(fn, file)
        if file.startswith("prometheus_client/"):
            return "metrics"
        if file.startswith(("logging/", "json/")):
            return "access log"
        if file == "socket.py":
            return "syscalls: recv/send (+ socket glue)"
        if file.startswith("proxycore/"):
            return _ours(fn, file)
        if file.startswith(_SKIP_PREFIXES):
            continue
        return "other: " + file
    return "unknown"


def _frames(stack: str) -> list[Frame]:
    out: list[Frame] = []
    for text in stack.split(";"):
        m = _FRAME.match(text)
        if m:
            out.append((m.group(1), m.group(2), int(m.group(3))))
    return out


def main(argv: list[str]) -> int:
    total_us = float(argv[1]) if len(argv) > 1 else None
    cats: Counter[str] = Counter()
    with open(argv[0], encoding="utf-8") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            cats[category(_frames(stack))] += int(count)
    busy = sum(cats.values()) - cats[IDLE]
    print(f"samples {sum(cats.values())}, busy {busy} (idle epoll_wait: {cats[IDLE]})")
    for name, n in cats.most_common():
        if name == IDLE or busy == 0:
            continue
        share = n / busy
        us = f"{share * total_us:7.1f} us" if total_us is not None else ""
        print(f"{n:7d} {100 * share:5.1f}% {us}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
