"""``--png``: latency CDFs and the TTFT and ITL distributions per target, drawn with
matplotlib (an optional extra: ``pip install 'proxycore[report]'``).

Histograms are drawn from each HDR histogram's percentiles in 0.5% steps (200 values
standing for the distribution), not from raw samples: the generator keeps none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from ..hdr import Histogram
from ..loadgen.spec import LoadResult

__all__ = ["MISSING", "ChartsUnavailable", "require_matplotlib", "write_png"]

MISSING: Final = "--png needs matplotlib, which is not installed: pip install 'proxycore[report]'"
_GRID: Final = [q / 2 for q in range(1, 201)]  # 0.5 .. 100


class ChartsUnavailable(RuntimeError):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    """Raise :class:`ChartsUnavailable` (message: :data:`MISSING`) if it cannot be used."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot
    except ImportError:
        raise ChartsUnavailable(MISSING) from None


def _ms(histogram: Histogram) -> list[float]:
    return [v * 1000.0 for v in histogram.percentiles(_GRID)] if histogram.count else []


def write_png(results: Sequence[LoadResult], path: str) -> None:
    """Draw the charts of ``results`` (one line or bar set per target) into ``path``."""
    require_matplotlib()
    import matplotlib.pyplot as plt

    streams = any(r.spec.stream for r in results)
    panels = 3 if streams else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    cdf = axes[0][0]
    for result in results:
        values = _ms(result.latency)
        if values:
            cdf.plot(values, _GRID, label=result.spec.url)
    cdf.set_title("latency CDF")
    cdf.set_xlabel("ms")
    cdf.set_ylabel("percentile")
    cdf.grid(True, alpha=0.3)
    cdf.legend(fontsize="small")
    if streams:
        for ax, name, title in ((axes[0][1], "ttft", "TTFT"), (axes[0][2], "itl", "ITL")):
            for result in results:
                values = _ms(getattr(result, name))
                if values:
                    ax.hist(values, bins=30, alpha=0.5, label=result.spec.url)
            ax.set_title(f"{title} (from percentiles)")
            ax.set_xlabel("ms")
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
