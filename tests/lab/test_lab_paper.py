"""`python -m lab paper` and `python -m lab scaling`: real (short) runs, resumability, the verdict."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.plots import check_png, legend_labels, lines
from lab import paper, scaling

LAB = Path(__file__).resolve().parents[2] / "lab"


def summary(bpb: list[float], total: int) -> dict:
    import statistics

    return {
        "bpb_mean": statistics.mean(bpb),
        "bpb_sd": statistics.stdev(bpb),
        "seeds": len(bpb),
        "memory": {"total": total},
    }


def test_the_table_names_one_thread_and_one_run_in_the_singular():
    assert "(seeds 1; 1 run at a time, 1 thread each)" in paper.to_markdown({}, (1,), 1, 1, [])
    assert "(seeds 1, 2; 2 runs at a time, 3 threads each)" in paper.to_markdown({}, (1, 2), 2, 3, [])


def test_the_lab_runs_from_any_folder_and_names_a_missing_recipe_in_one_line(tmp_path):
    listed = subprocess.run([sys.executable, str(LAB), "--list"], cwd=tmp_path, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["paper", "bytes", "scaling", "train-quickstart"]
    missing = subprocess.run(
        [sys.executable, str(LAB), "paper", "--recipes", str(tmp_path / "none"), "--out", str(tmp_path / "out")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"lab paper: error: no recipe {tmp_path / 'none'}/vanilla-3.yaml (pass --recipes DIR, a folder of the "
        "models' recipes)"
    ]
    assert not (tmp_path / "out").exists()


def test_the_verdict_weighs_the_effect_against_the_seed_spread():
    ref = summary([2.00, 2.01, 1.99], 100)
    assert paper.verdict(summary([1.90, 1.91, 1.89], 80), ref)[0] == "holds"
    assert paper.verdict(summary([1.995, 2.012, 1.985], 80), ref)[0] == "within noise"
    assert paper.verdict(summary([1.90, 1.91, 1.89], 120), ref)[0] == "does not hold"  # more memory
    assert paper.verdict(summary([2.10, 2.11, 2.09], 80), ref)[0] == "does not hold"  # worse, beyond noise
    word, why = paper.verdict(summary([1.90, 1.91, 1.89], 80), ref)
    assert "memory -20%" in why and "-0.1000 bits/byte" in why


@pytest.mark.slow
def test_bench_paper_trains_every_model_and_seed_and_skips_finished_runs(tmp_path, monkeypatch, saved_plots):
    args = argparse.Namespace(
        models=("vanilla-3", "bottom_up-6"),
        seeds=(1, 2),
        runs=str(tmp_path / "runs"),
        out=str(tmp_path / "out"),
        jobs=2,
        set=["train.max_steps=4", "eval.every=2", "eval.max_batches=1", "log.every=1"],
    )
    text = paper.bench_paper(args)
    results = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/result.json")}
    assert sorted(results) == ["bottom_up-6-seed1", "bottom_up-6-seed2", "vanilla-3-seed1", "vanilla-3-seed2"]
    # Different seeds give different models; every run was evaluated along the way.
    assert results["vanilla-3-seed1"]["bits_per_byte"] != results["vanilla-3-seed2"]["bits_per_byte"]
    assert all(len(r["curve"]) >= 2 for r in results.values())
    assert "| vanilla-3 | 3 |" in text and "bottom_up-6: **" in text
    assert sorted(saved_plots) == ["paper-bpb.png", "paper-memory.png"]
    for fig, path in saved_plots.values():
        assert path.parent == tmp_path / "out"
        check_png(fig, path)
    bpb, _ = saved_plots["paper-bpb.png"]
    assert legend_labels(bpb) == list(args.models)  # one curve per model, its seeds' mean
    for model, (tokens, mean) in lines(bpb.axes[0]).items():
        curves = [results[f"{model}-seed{seed}"]["curve"] for seed in args.seeds]
        assert tokens == [t for t, _ in curves[0]]
        assert mean == pytest.approx([sum(c[i][1] for c in curves) / len(curves) for i in range(len(tokens))])
    memory, _ = saved_plots["paper-memory.png"]
    assert [t.get_text() for t in memory.axes[0].get_xticklabels()] == list(args.models)  # one bar per model

    # A second run trains nothing: it reads the saved results (no subprocess may start).
    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(paper.subprocess, "run", no_training)
    assert paper.bench_paper(args) == text


def test_bench_scaling_fits_exponents_and_plots(tmp_path, saved_plots):
    text = scaling.bench_scaling(
        argparse.Namespace(lengths=(128, 256), models=("vanilla", "bottom_up"), out=str(tmp_path))
    )
    assert text.count("| vanilla |") == 1 and text.count("| bottom_up |") == 1
    fig, path = saved_plots["scaling.png"]
    assert path == tmp_path / "scaling.png"
    check_png(fig, path)
    assert legend_labels(fig) == ["vanilla", "bottom_up"]
    for ax in fig.axes:  # step time, step memory: one line per model, a point per length
        assert {model: x for model, (x, _) in lines(ax).items()} == {"vanilla": [128, 256], "bottom_up": [128, 256]}
    assert scaling.exponent([(1, 3), (2, 12), (4, 48)]) == pytest.approx(2.0)
