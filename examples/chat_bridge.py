"""The browser-chat bridge (REFERENCE.md section 2) as proxycore hooks.

POST /chat/... with ``{"session_id"?, "message"}``: the user's turn is stored before the
request goes upstream; the backend's SSE answer is relayed verbatim (an SSE ``error``
event if it fails); the assistant's text and session id are stored when it ends.

    python examples/chat_bridge.py --upstream URL --listen 127.0.0.1:8080 --db chat.sqlite
"""

from __future__ import annotations

import argparse
import functools
import json
import sqlite3
from contextlib import closing, suppress
from dataclasses import dataclass, field

import trio

from proxycore import Config, Route, ServerSettings, Timeouts, serve
from proxycore.config.model import SSESettings
from proxycore.http.sse import SSEEvent
from proxycore.proxy.hooks import ExchangeInfo, Hooks, Request, Response, Summary

Row = tuple[str, str | None, str, str, str]  # request_id, session_id, role, text, outcome


class ChatStore:  # a sqlite3 file; one connection per call, written from a worker thread
    def __init__(self, path: str) -> None:
        self.path = path
        self._sql("CREATE TABLE IF NOT EXISTS turns (request_id, session_id, role, text, outcome)")

    def _sql(self, sql: str, *args: object) -> list[Row]:
        with closing(sqlite3.connect(self.path)) as db, db:
            return db.execute(sql, args).fetchall()

    async def add(self, *row: str | None) -> None:
        await trio.to_thread.run_sync(self._sql, "INSERT INTO turns VALUES (?,?,?,?,?)", *row)

    def turns(self) -> list[Row]:
        return self._sql("SELECT * FROM turns ORDER BY rowid")


@dataclass
class Turn:
    session_id: str | None
    text: list[str] = field(default_factory=list)
    outcome: str = "incomplete"  # "complete" once `done` is seen, "error" on an error


def make_hooks(store: ChatStore) -> Hooks:
    async def on_request(request: Request) -> Response | None:
        if request.body is None:  # not whole in the first read: can't store it before upstream
            return Response(413, [(b"Content-Type", b"text/plain")], b"message too long")
        try:
            body = json.loads(request.body)
            message, session = str(body["message"]), body.get("session_id")
        except (ValueError, KeyError, TypeError, AttributeError):
            return Response(400, [(b"Content-Type", b"text/plain")], b'expected {"message": ...}')
        turn = request.exchange.extra["turn"] = Turn(None if session is None else str(session))
        await store.add(request.exchange.request_id, turn.session_id, "user", message, "stored")
        return None

    async def on_sse_event(exchange: ExchangeInfo, event: SSEEvent) -> None:
        turn = exchange.extra.get("turn")
        with suppress(ValueError):
            data = json.loads(event.data)
            if isinstance(turn, Turn) and isinstance(data, dict):
                kind = data.get("type")
                if kind == "session_id":
                    turn.session_id = str(data.get("session_id"))
                elif kind == "text_delta":
                    turn.text.append(str(data.get("text", "")))
                elif kind in ("done", "error"):
                    turn.outcome = "complete" if kind == "done" else "error"

    async def on_exchange_end(exchange: ExchangeInfo, summary: Summary) -> None:
        turn = exchange.extra.get("turn")
        if isinstance(turn, Turn):  # a failure the proxy saw (backend died, timeout) is an error
            outcome = turn.outcome if summary.outcome == "complete" else "error"
            row = (exchange.request_id, turn.session_id, "assistant", "".join(turn.text), outcome)
            await store.add(*row)

    return Hooks(on_request=on_request, on_sse_event=on_sse_event, on_exchange_end=on_exchange_end)


def make_config(upstream: str, listen: str) -> Config:
    timeouts = Timeouts(connect=10, response=3600, idle=3600)  # an answer may think long
    route = Route(
        prefix="/chat/", upstream=upstream, timeouts=timeouts, sse=SSESettings(errors=True)
    )
    return Config(routes=(route,), server=ServerSettings(listen=(listen,)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="proxycore chat bridge")
    parser.add_argument("--upstream", required=True, help="chat backend base URL")
    parser.add_argument("--listen", default="127.0.0.1:8080")
    parser.add_argument("--db", default="chat.sqlite", help="sqlite3 file for the turns")
    args = parser.parse_args(argv)
    start = functools.partial(serve, make_config(args.upstream, args.listen))
    with suppress(KeyboardInterrupt):
        trio.run(functools.partial(start, hooks=make_hooks(ChatStore(args.db))))


if __name__ == "__main__":
    main()
