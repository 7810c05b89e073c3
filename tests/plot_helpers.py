"""Reading back the benchmarks' plots (tests/test_plots.py, test_bench_*.py, tests/lab): the series a
figure draws, the PNG it was saved as, and the checks every plot passes. Nothing is tested here."""

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


def overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def check_readable(fig) -> list[str]:
    """The checks every plot passes; returns the legend's labels."""
    fig.canvas.draw()
    assert all(ax.get_legend() is None for ax in fig.axes), "a legend inside an axes"
    assert len(fig.legends) == 1
    legend = fig.legends[0].get_window_extent()
    for ax in fig.axes:
        assert not overlaps(legend, ax.get_window_extent()), f"the legend overlaps the axes {ax.get_title()!r}"
        x0, x1 = sorted(ax.get_xlim())
        y0, y1 = sorted(ax.get_ylim())
        for line in ax.lines:
            if line.get_label().startswith("target"):
                continue
            assert all(x0 <= x <= x1 for x in line.get_xdata()), f"{line.get_label()}: a point left of/right of the axes"
            assert all(y0 <= y <= y1 for y in line.get_ydata()), f"{line.get_label()}: a point above/below the axes"
        for bar in ax.patches:
            assert y0 <= bar.get_y() + bar.get_height() <= y1
    return legend_labels(fig)


def check_saved_png(fig, path: Path) -> None:
    """Saved, the figure is a PNG of its size x DPI pixels."""
    plotting.save(fig, path)
    check_png(fig, path)
