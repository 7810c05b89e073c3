"""The lab's plots (paper, scaling) show what their captions say, as the benchmarks' do
(tests/unit/test_plots.py: the same checks); then each committed plot in lab/results is redrawn from its
committed table."""

from __future__ import annotations

import shutil

import matplotlib.image
import pytest

from fixtures.plots import check_readable, check_saved_png, lines
from lab import RESULTS, paper, scaling

# ------------------------------------------------------------------------------------------------
# paper
# ------------------------------------------------------------------------------------------------


def test_paper_memory_chart_stacks_the_parts_of_each_step(tmp_path):
    mib = 2**20
    memory = {
        "vanilla-3": {
            "parameters": 10 * mib,
            "gradients": 10 * mib,
            "optimizer": 20 * mib,
            "body_activations": 200 * mib,
            "loss_activations": 60 * mib,
            "activations": 260 * mib,
            "total": 300 * mib,
        },
        "retina-6": {
            "parameters": 12 * mib,
            "gradients": 12 * mib,
            "optimizer": 24 * mib,
            "body_activations": 320 * mib,
            "loss_activations": 60 * mib,
            "activations": 380 * mib,
            "total": 428 * mib,
        },
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
    results = [
        {"model": m, "seed": s, "curve": [[t * 1000, 2.5 - 0.05 * t + 0.01 * s + 0.02 * i] for t in (1, 2, 3)]}
        for i, m in enumerate(("vanilla-3", "top_down-6"))
        for s in (1, 2, 3)
    ]
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
    results = {
        arch: [{"L": L, "step_s": 0.01 * (i + 1) * L / 1024, "memory": (i + 1) * L * 2**14} for L in (1024, 2048, 4096)]
        for i, arch in enumerate(("vanilla", "bottom_up"))
    }
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


@pytest.mark.parametrize(
    "name,replot,pngs",
    [
        ("paper", paper.replot, ["paper-memory.png"]),
        ("scaling", scaling.replot, ["scaling.png"]),
    ],
)
def test_the_committed_plots_are_drawn_from_the_committed_tables(name, replot, pngs, tmp_path):
    shutil.copy(RESULTS / f"{name}.md", tmp_path)
    replot(tmp_path)
    for png in pngs:
        redrawn = matplotlib.image.imread(tmp_path / png)
        committed = matplotlib.image.imread(RESULTS / png)
        assert committed.shape == redrawn.shape, (
            f"lab/results/{png} is not what the plot code draws now: "
            f"python -c 'from lab import RESULTS; from lab.{name} import replot; replot(RESULTS)'"
        )
