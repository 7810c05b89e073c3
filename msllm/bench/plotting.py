"""What the benchmarks' plots share, so that each reads at a glance: one legend outside the axes
(it can hide no data), the sequence-length axis, a fixed size, and the benchmark's own committed
table read back, so that a plot can be redrawn without measuring again.

Each plotting benchmark has `figure(...) -> matplotlib Figure` (what the tests inspect), `plot(...)`
(figure, then saved) and `replot(out)` (its committed table in out/NAME.md, plotted again).
The rows are read back from the markdown the registry appended rather than kept in a second file:
the markdown is the one record (with its command, date and machine), and the committed plots
predate any other.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from msllm.errors import MsllmError

DPI = 110


def new_figure(width: float, height: float, **subplots):
    """(figure, axes) with the layout that keeps a figure legend outside every axes."""
    import matplotlib  # noqa: PLC0415 (optional: matplotlib, the [plots] extra)

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt  # noqa: PLC0415 (optional: matplotlib, the [plots] extra)

    return plt.subplots(figsize=(width, height), layout="constrained", squeeze=False, **subplots)


def legend_outside(fig, where: str = "lower center", ncols: int = 4):
    """One legend for the figure, outside the axes (below them, or "right upper" beside them), with
    each label of the axes' series once."""
    entries = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    return fig.legend(list(entries.values()), list(entries), loc=f"outside {where}", ncols=ncols, frameon=False)


def length_axis(ax, lengths) -> None:
    """Sequence length on a log-2 axis, a tick at each measured L (256, 1k, 16k, ...)."""
    import matplotlib.ticker  # noqa: PLC0415 (optional: matplotlib, the [plots] extra)

    lengths = sorted(set(lengths))
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{L // 1024}k" if L >= 1024 and L % 1024 == 0 else str(L) for L in lengths])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    if len(lengths) > 1:
        ax.set_xlim(lengths[0] / 1.25, lengths[-1] * 1.25)


def seed_band(ax, label: str, xs, curves, dashed: bool = False) -> None:
    """One line per model: the mean over the seeds' `curves` (each a list of y values at `xs`), with a
    band from the lowest to the highest seed at each point."""
    per_point = list(zip(*curves))
    (line,) = ax.plot(
        xs,
        [statistics.mean(p) for p in per_point],
        label=label,
        marker="o",
        markersize=3,
        linestyle="--" if dashed else "-",
    )
    ax.fill_between(
        xs, [min(p) for p in per_point], [max(p) for p in per_point], color=line.get_color(), alpha=0.2, linewidth=0
    )


def save(fig, path: Path) -> Path:
    """The figure as a PNG of exactly its size x DPI pixels, then closed."""
    import matplotlib.pyplot as plt  # noqa: PLC0415 (optional: matplotlib, the [plots] extra)

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def last_section(markdown: str) -> str:
    """The newest section (`## date`) of a benchmark file: the registry appends one per run."""
    sections = re.split(r"^## ", markdown, flags=re.M)
    if len(sections) < 2:
        raise MsllmError("no benchmark section (## ...) to plot: run the benchmark first")
    return sections[-1]


def table_rows(section: str) -> list[dict[str, str]]:
    """The first markdown table of a section, one {header: cell} per row."""
    lines = [line.strip() for line in section.splitlines()]
    start = next(
        i
        for i, line in enumerate(lines)
        if line.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1])
    )
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def number(cell: str) -> float:
    """A table's number: "12,345", "22.1%" (as 0.221), "1.15"."""
    cell = cell.replace(",", "").strip()
    return float(cell[:-1]) / 100 if cell.endswith("%") else float(cell)
