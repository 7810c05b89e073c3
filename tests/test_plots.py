"""The benchmarks' plots show what their captions say: the series drawn (inspected on the
matplotlib Figure), labelled axes with units, one legend outside every axes (it hides no data),
no point outside the axes' limits, and a PNG of the figure's size. Then each committed plot is
redrawn from its committed table."""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib.image
import pytest

from msllm.bench import paper, plotting, scaling, throughput
from plot_helpers import check_png, legend_labels, lines

REPO = Path(__file__).resolve().parents[1]


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


# ------------------------------------------------------------------------------------------------
# throughput
# ------------------------------------------------------------------------------------------------


def toy_throughput_rows() -> list[dict]:
    rows = []
    for i, model in enumerate(("vanilla", "bottom_up", "hf_llama")):
        for L in (256, 1024):
            for j, mode in enumerate(("eager", "compiled")):
                bare = 1000.0 * (i + 1) + 100 * j + L / 16
                rows.append({"model": model, "mode": mode, "loop": "bare", "L": L, "batch": 4096 // L,
                             "tokens_per_s": bare, "mfu": 0.2, "peak_gib": 1.0 + 0.1 * i})
                if model != "hf_llama":
                    rows.append({"model": model, "mode": mode, "loop": "msllm train", "L": L, "batch": 4096 // L,
                                 "tokens_per_s": 0.9 * bare + j, "mfu": 0.18, "peak_gib": 1.2 + 0.1 * i})
    rows.append({"model": "vanilla", "mode": "compiled", "loop": "msllm train", "L": 4096, "error": "out of memory"})
    return rows


def test_throughput_plot_shows_both_loops_their_ratio_and_memory(tmp_path):
    rows = toy_throughput_rows()
    fig = throughput.figure(rows, throughput.title("CPU"))
    assert "msllm train against the bare loop" in fig._suptitle.get_text()
    assert len(fig.axes) == 9
    speed, ratio, memory = fig.axes[0:3], fig.axes[3:6], fig.axes[6:9]  # one row each, one column per model
    assert [ax.get_title() for ax in speed] == ["vanilla", "bottom_up", "hf_llama"]

    series = {"bare, eager", "bare, compiled", "msllm train, eager", "msllm train, compiled"}
    drawn = lines(speed[0])
    assert set(drawn) == series  # the failed row (L=4096) is left out
    assert drawn["msllm train, compiled"] == ([256, 1024], [r["tokens_per_s"] for r in rows if (
        r["model"], r["loop"], r["mode"]) == ("vanilla", "msllm train", "compiled") and "error" not in r])
    ratios = lines(ratio[1])
    assert set(ratios) == {"msllm train, eager", "msllm train, compiled", "target 0.95x"}
    bare = {(r["mode"], r["L"]): r["tokens_per_s"] for r in rows if (r["model"], r["loop"]) == ("bottom_up", "bare")}
    train = {(r["mode"], r["L"]): r["tokens_per_s"] for r in rows if (r["model"], r["loop"]) == ("bottom_up", "msllm train")}
    assert ratios["msllm train, eager"][1] == pytest.approx([train["eager", L] / bare["eager", L] for L in (256, 1024)])
    assert set(lines(speed[2])) == {"bare, eager", "bare, compiled"} and not lines(ratio[2])  # no trainer run of Llama
    assert set(lines(memory[0])) == series

    assert memory[0].get_yscale() == "linear" and memory[0].get_ylim()[0] == 0
    assert speed[0].get_ylim()[0] == 0
    assert [ax.get_xlabel() for ax in memory] == ["sequence length L (tokens)"] * 3
    assert "tokens/s" in speed[0].get_ylabel() and "GiB" in memory[0].get_ylabel()
    assert "/ bare" in ratio[0].get_ylabel()
    assert [t.get_text() for t in memory[0].get_xticklabels()] == ["256", "1k"]
    assert check_readable(fig) == ["bare, eager", "bare, compiled", "msllm train, eager", "msllm train, compiled",
                                   "target 0.95x"]
    check_saved_png(fig, tmp_path / "throughput.png")


def test_throughput_rows_read_back_from_the_table():
    rows = [{**r, "loss": "chunked"} for r in toy_throughput_rows()]
    section = throughput.table(rows, throughput.CPU)
    back = throughput.rows_from_markdown(section)
    assert [(r["model"], r["mode"], r["loop"], r["L"]) for r in back] == [(r["model"], r["mode"], r["loop"], r["L"])
                                                                          for r in rows]
    assert back[-1]["error"] == "out of memory"
    assert [r["tokens_per_s"] for r in back[:-1]] == [round(r["tokens_per_s"]) for r in rows[:-1]]
    assert [r["peak_gib"] for r in back[:-1]] == [round(r["peak_gib"], 2) for r in rows[:-1]]


# ------------------------------------------------------------------------------------------------
# paper
# ------------------------------------------------------------------------------------------------


def test_paper_memory_chart_stacks_the_parts_of_each_step(tmp_path):
    mib = 2**20
    memory = {
        "vanilla-3": {"parameters": 10 * mib, "gradients": 10 * mib, "optimizer": 20 * mib,
                      "body_activations": 200 * mib, "loss_activations": 60 * mib, "activations": 260 * mib,
                      "total": 300 * mib},
        "retina-6": {"parameters": 12 * mib, "gradients": 12 * mib, "optimizer": 24 * mib,
                     "body_activations": 320 * mib, "loss_activations": 60 * mib, "activations": 380 * mib,
                     "total": 428 * mib},
    }
    fig = paper.memory_figure(memory)
    ax = fig.axes[0]
    labels = check_readable(fig)
    assert labels == ["parameters", "gradients", "optimizer", "body activations", "loss activations"]
    assert len(ax.containers) == 5  # one stack of bars per part: "activations" is not counted twice
    tops = [max(bar.get_y() + bar.get_height() for bar in bars) for bars in zip(*ax.containers)]
    assert tops == [300, 428]
    assert [t.get_text() for t in ax.texts] == ["300", "428"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["vanilla-3", "retina-6"]
    assert "MiB" in ax.get_ylabel()
    check_saved_png(fig, tmp_path / "paper-memory.png")


def test_paper_bpb_plot_draws_each_model_with_its_seed_band(tmp_path):
    results = [{"model": m, "seed": s, "curve": [[t * 1000, 2.5 - 0.05 * t + 0.01 * s + 0.02 * i] for t in (1, 2, 3)]}
               for i, m in enumerate(("vanilla-3", "top_down-6")) for s in (1, 2, 3)]
    fig = paper.bpb_figure(results)
    ax = fig.axes[0]
    assert check_readable(fig) == ["vanilla-3", "top_down-6"]
    drawn = lines(ax)
    assert drawn["top_down-6"][0] == [1000, 2000, 3000]
    assert drawn["top_down-6"][1] == pytest.approx([2.5 - 0.05 * t + 0.02 + 0.02 for t in (1, 2, 3)])  # seed mean
    assert len(ax.collections) == 2  # the lowest-to-highest band of each model
    assert ax.get_xlabel() == "training tokens (thousands)" and ax.get_ylabel() == "validation bits per byte"
    check_saved_png(fig, tmp_path / "paper-bpb.png")


# ------------------------------------------------------------------------------------------------
# scaling
# ------------------------------------------------------------------------------------------------


def test_scaling_plot_draws_time_and_memory_per_architecture(tmp_path):
    results = {arch: [{"L": L, "step_s": 0.01 * (i + 1) * L / 1024, "memory": (i + 1) * L * 2**14} for L in (1024, 2048, 4096)]
               for i, arch in enumerate(("vanilla", "bottom_up"))}
    fig = scaling.figure(results)
    time_ax, memory_ax = fig.axes
    assert check_readable(fig) == ["vanilla", "bottom_up"]
    assert lines(time_ax)["bottom_up"] == ([1024, 2048, 4096], pytest.approx([0.02, 0.04, 0.08]))
    assert lines(memory_ax)["vanilla"][1] == pytest.approx([16, 32, 64])  # MiB
    assert time_ax.get_ylabel() == "training step time (s)" and memory_ax.get_ylabel() == "training step memory (MiB)"
    assert [t.get_text() for t in time_ax.get_xticklabels()] == ["1k", "2k", "4k"]
    check_saved_png(fig, tmp_path / "scaling.png")


# ------------------------------------------------------------------------------------------------
# The committed plots, from the committed tables
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,replot,pngs", [
    ("throughput", throughput.replot, ["throughput.png"]),
    ("paper", paper.replot, ["paper-memory.png"]),
    ("scaling", scaling.replot, ["scaling.png"]),
])
def test_the_committed_plots_are_drawn_from_the_committed_tables(name, replot, pngs, tmp_path):
    shutil.copy(REPO / "benchmarks" / f"{name}.md", tmp_path)
    replot(tmp_path)
    for png in pngs:
        redrawn = matplotlib.image.imread(tmp_path / png)
        committed = matplotlib.image.imread(REPO / "benchmarks" / png)
        assert committed.shape == redrawn.shape, f"benchmarks/{png} is not what the plot code draws now: " \
            f"python -c 'from pathlib import Path; from msllm.bench.{name} import replot; replot(Path(\"benchmarks\"))'"
