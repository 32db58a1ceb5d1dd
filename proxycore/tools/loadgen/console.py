"""The run on a terminal: the live progress line (rich on a terminal, plain lines
otherwise) and the result tables (rich)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, TextIO

from ..loadgen.report import STAT_COLUMNS, compare_rows, describe, summary_rows, timing_rows
from ..loadgen.spec import LoadProgress, LoadResult

if TYPE_CHECKING:
    from rich.console import Console
    from rich.live import Live

__all__ = ["LIVE_INTERVAL", "PLAIN_INTERVAL", "Reporter", "print_tables", "progress_text"]

#: Seconds between progress updates on a terminal, and between plain progress lines.
LIVE_INTERVAL: Final = 0.5
PLAIN_INTERVAL: Final = 2.0


def progress_text(p: LoadProgress) -> str:
    text = f"{p.elapsed:5.1f}s  ok {p.ok}  errors {p.errors}"
    if p.dropped:
        text += f"  dropped {p.dropped}"
    text += f"  in flight {p.in_flight}  {p.rps:,.0f} req/s"
    if p.ok:
        text += f"  ttfb p50 {p.ttfb_p50 * 1000:.2f} p99 {p.ttfb_p99 * 1000:.2f} ms"
    return text


class Reporter:
    """Progress while the run goes: rich.live on a terminal, plain lines otherwise."""

    def __init__(self, console: Console, out: TextIO, labels: list[str]) -> None:
        self._console = console
        self._out = out
        self._labels = labels
        self._live: Live | None = None
        self.interval = LIVE_INTERVAL if console.is_terminal else PLAIN_INTERVAL

    def __enter__(self) -> Reporter:
        if self._console.is_terminal:
            from rich.live import Live
            from rich.text import Text

            self._live = Live(
                Text("starting..."), console=self._console, auto_refresh=False, transient=True
            )
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()

    def __call__(self, index: int, progress: LoadProgress) -> None:
        line = progress_text(progress)
        if len(self._labels) > 1:
            line = f"[{self._labels[index]}] {line}"
        if self._live is not None:
            from rich.text import Text

            self._live.update(Text(line, no_wrap=True, overflow="ellipsis"), refresh=True)
        else:
            print(line, file=self._out, flush=True)


def print_tables(console: Console, results: list[LoadResult]) -> None:
    from rich.table import Table

    for result in results:
        console.print(describe(result.spec), markup=False)
        summary = Table(show_header=False)
        summary.add_column("what")
        summary.add_column("value", justify="right")
        for row in summary_rows(result):
            summary.add_row(*row)
        console.print(summary)
        timings = Table(title="timings (ms; successful responses)")
        timings.add_column("metric")
        for name in STAT_COLUMNS:
            timings.add_column(name, justify="right")
        timings.add_column("count", justify="right")
        for name, cells, count in timing_rows(result):
            timings.add_row(name, *cells, str(count))
        console.print(timings)
    if len(results) > 1:
        table = Table(title="comparison (ratio to the first target)")
        table.add_column("figure")
        for result in results:
            table.add_column(result.spec.url, justify="right")
        for name, cells in compare_rows(results):
            table.add_row(name, *cells)
        console.print(table)
