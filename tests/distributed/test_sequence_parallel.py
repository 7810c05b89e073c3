"""Sequence parallelism: the halo exchange, DeepSpeed-Ulysses attention and every architecture,
split over 2 or 4 gloo ranks, match the unsplit computation in float64 (outputs and gradients).

The training-level check (same losses step after step with sp=2 as with sp=1) is in
test_train_sequence_parallel.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures.launch import clean_env, torchrun

SCRIPT = Path(__file__).parent / "sp_equivalence.py"
CHECKS = ["halo-shift", "halo-local-attention", "ulysses-attention", "vanilla", "vanilla-local", "bottom_up",
          "top_down", "retina", "retina-k4"]


@pytest.mark.distributed
@pytest.mark.parametrize("nproc,sp", [(2, 2), (4, 2), (4, 4)], ids=["sp2", "dp2xsp2", "sp4"])
def test_split_computation_matches_the_unsplit_one(nproc, sp):
    done = torchrun(nproc, SCRIPT, env=clean_env(SP=str(sp)))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "ALL CHECKS PASSED" in done.stdout
    checked = [line for line in done.stdout.splitlines() if line.startswith("CHECKED")]
    for name in CHECKS:
        assert any(line.startswith(f"CHECKED {name} ") for line in checked), f"{name} was not checked"
