"""Reading back the benchmarks' plots (tests/test_plots.py, test_bench_*.py): the series a
figure draws and the PNG it was saved as. Nothing is tested here."""

from __future__ import annotations

from pathlib import Path

from msllm.bench import plotting


def lines(ax) -> dict:
    """{label: (x values, y values)} of the lines an axes draws."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}


def legend_labels(fig) -> list[str]:
    """The labels of the figure's legends, in order."""
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def check_png(fig, path: Path) -> None:
    """The file at `path` decodes as a PNG of the figure's size x DPI pixels."""
    import matplotlib.image

    width, height = fig.get_size_inches() * plotting.DPI
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (round(height), round(width)), (path, image.shape)
