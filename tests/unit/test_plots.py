"""The benchmarks' plots show what their captions say: the series drawn (inspected on the
matplotlib Figure), labelled axes with units, one legend outside every axes (it hides no data),
no point outside the axes' limits, and a PNG of the figure's size. Then each committed plot is
redrawn from its committed table. (The lab's plots: tests/lab/test_lab_plots.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib.image
import pytest

from fixtures.plots import check_readable, check_saved_png, lines
from msllm.bench import throughput

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------
# throughput
# ------------------------------------------------------------------------------------------------


def toy_throughput_rows() -> list[dict]:
    rows = []
    for i, model in enumerate(("vanilla", "bottom_up", "hf_llama")):
        for L in (256, 1024):
            for j, mode in enumerate(("eager", "compiled")):
                bare = 1000.0 * (i + 1) + 100 * j + L / 16
                rows.append(
                    {
                        "model": model,
                        "mode": mode,
                        "loop": "bare",
                        "L": L,
                        "batch": 4096 // L,
                        "tokens_per_s": bare,
                        "mfu": 0.2,
                        "peak_gib": 1.0 + 0.1 * i,
                    }
                )
                if model != "hf_llama":
                    rows.append(
                        {
                            "model": model,
                            "mode": mode,
                            "loop": "msllm train",
                            "L": L,
                            "batch": 4096 // L,
                            "tokens_per_s": 0.9 * bare + j,
                            "mfu": 0.18,
                            "peak_gib": 1.2 + 0.1 * i,
                        }
                    )
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
    assert drawn["msllm train, compiled"] == (
        [256, 1024],
        [
            r["tokens_per_s"]
            for r in rows
            if (r["model"], r["loop"], r["mode"]) == ("vanilla", "msllm train", "compiled") and "error" not in r
        ],
    )
    ratios = lines(ratio[1])
    assert set(ratios) == {"msllm train, eager", "msllm train, compiled", "target 0.95x"}
    bare = {(r["mode"], r["L"]): r["tokens_per_s"] for r in rows if (r["model"], r["loop"]) == ("bottom_up", "bare")}
    train = {
        (r["mode"], r["L"]): r["tokens_per_s"] for r in rows if (r["model"], r["loop"]) == ("bottom_up", "msllm train")
    }
    assert ratios["msllm train, eager"][1] == pytest.approx([train["eager", L] / bare["eager", L] for L in (256, 1024)])
    assert set(lines(speed[2])) == {"bare, eager", "bare, compiled"} and not lines(ratio[2])  # no trainer run of Llama
    assert set(lines(memory[0])) == series

    assert memory[0].get_yscale() == "linear" and memory[0].get_ylim()[0] == 0
    assert speed[0].get_ylim()[0] == 0
    assert [ax.get_xlabel() for ax in memory] == ["sequence length L (tokens)"] * 3
    assert "tokens/s" in speed[0].get_ylabel() and "GiB" in memory[0].get_ylabel()
    assert "/ bare" in ratio[0].get_ylabel()
    assert [t.get_text() for t in memory[0].get_xticklabels()] == ["256", "1k"]
    assert check_readable(fig) == [
        "bare, eager",
        "bare, compiled",
        "msllm train, eager",
        "msllm train, compiled",
        "target 0.95x",
    ]
    check_saved_png(fig, tmp_path / "throughput.png")


def test_throughput_rows_read_back_from_the_table():
    rows = [{**r, "loss": "chunked"} for r in toy_throughput_rows()]
    section = throughput.table(rows, throughput.CPU)
    back = throughput.rows_from_markdown(section)
    assert [(r["model"], r["mode"], r["loop"], r["L"]) for r in back] == [
        (r["model"], r["mode"], r["loop"], r["L"]) for r in rows
    ]
    assert back[-1]["error"] == "out of memory"
    assert [r["tokens_per_s"] for r in back[:-1]] == [round(r["tokens_per_s"]) for r in rows[:-1]]
    assert [r["peak_gib"] for r in back[:-1]] == [round(r["peak_gib"], 2) for r in rows[:-1]]


# ------------------------------------------------------------------------------------------------
# The committed plots, from the committed tables
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,replot,pngs",
    [
        ("throughput", throughput.replot, ["throughput.png"]),
    ],
)
def test_the_committed_plots_are_drawn_from_the_committed_tables(name, replot, pngs, tmp_path):
    shutil.copy(REPO / "benchmarks" / f"{name}.md", tmp_path)
    replot(tmp_path)
    for png in pngs:
        redrawn = matplotlib.image.imread(tmp_path / png)
        committed = matplotlib.image.imread(REPO / "benchmarks" / png)
        assert committed.shape == redrawn.shape, (
            f"benchmarks/{png} is not what the plot code draws now: "
            f"python -c 'from pathlib import Path; from msllm.bench.{name} import replot; replot(Path(\"benchmarks\"))'"
        )
