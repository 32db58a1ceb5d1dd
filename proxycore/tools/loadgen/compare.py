"""Compare mode: the same workload against several targets in interleaved rounds.

The run's ``requests`` (or ``duration``) is per target, split evenly over the rounds;
round ``r`` visits the targets in order when ``r`` is even and in reverse when odd (A B,
B A, A B...), so drift on the machine (a warming cache, a neighbour's load) falls on every
target alike. Each target's rounds are merged into one result; every figure is then
given with its ratio to the first target's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial

from ..loadgen.engine import run_load
from ..loadgen.figures import figures, merge
from ..loadgen.spec import LoadProgress, LoadResult, LoadSpec

__all__ = ["ratios", "round_specs", "run_rounds"]


def round_specs(spec: LoadSpec, rounds: int) -> list[LoadSpec | None]:
    """``spec`` cut into ``rounds`` parts (None: a round with no request left).

    Raises ValueError if ``rounds`` < 1.
    """
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    out: list[LoadSpec | None] = []
    for r in range(rounds):
        changes: dict[str, object] = {}
        if spec.requests is not None:
            share = spec.requests // rounds + (1 if r < spec.requests % rounds else 0)
            if share == 0:
                out.append(None)
                continue
            changes["requests"] = share
        if spec.duration is not None:
            changes["duration"] = spec.duration / rounds
        out.append(dataclasses.replace(spec, **changes))  # type: ignore[arg-type]
    return out


async def run_rounds(
    specs: Sequence[LoadSpec],
    rounds: int,
    *,
    progress: Callable[[int, LoadProgress], None] | None = None,
    progress_interval: float = 0.5,
    on_round: Callable[[int, int], None] | None = None,
) -> list[LoadResult]:
    """Run every spec in ``rounds`` interleaved rounds; one merged result per spec.

    ``progress(target index, progress)`` while each part runs; ``on_round(round,
    target index)`` before each part starts.
    """
    parts = [round_specs(spec, rounds) for spec in specs]
    done: list[list[LoadResult]] = [[] for _ in specs]
    for r in range(rounds):
        order = list(range(len(specs)))
        if r % 2:
            order.reverse()
        for index in order:
            part = parts[index][r]
            if part is None:
                continue
            if on_round is not None:
                on_round(r, index)
            if progress is not None:
                report = partial(progress, index)
                result = await run_load(part, progress=report, progress_interval=progress_interval)
            else:
                result = await run_load(part)
            done[index].append(result)
    return [merge(results) for results in done]


def ratios(results: Sequence[LoadResult]) -> list[dict[str, float | None]]:
    """Per target, every figure over the first target's (None where that one is 0)."""
    base = figures(results[0])
    out: list[dict[str, float | None]] = []
    for result in results:
        mine = figures(result)
        out.append({k: (v / base[k] if base[k] else None) for k, v in mine.items()})
    return out
