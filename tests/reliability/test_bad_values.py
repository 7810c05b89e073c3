"""Issue 12, item 11: values that cannot train are refused before anything starts (one line, exit 2,
nothing created), instead of a ZeroDivisionError or a run that diverges."""

from __future__ import annotations

import pytest

from fixtures.reliability import cli, one_line
from fixtures.train import make_recipe


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=0", "train.lr: must be positive, got 0.0"),
        ("train.lr=-0.001", "train.lr: must be positive"),
        ("train.min_lr=-0.001", "train.min_lr: must not be negative"),
        ("train.lr=.nan", "train.lr: must be a finite number, got nan"),
        ("train.lr=.inf", "train.lr: must be a finite number, got inf"),
        ("train.betas=[0.9, 1.5]", "train.betas[1]: must be in [0, 1), got 1.5"),
        ("model.init_std=-0.02", "model.init_std: must be positive"),
        ("train.weight_decay=-0.1", "train.weight_decay: must not be negative"),
        ("train.eps=0", "train.eps: must be positive"),
        ("train.max_skipped_steps=0", "train.max_skipped_steps: must be at least 1"),
    ],
)
def test_bad_value_refused_before_start(tmp_path, tiny_data, capsys, override, message):
    recipe, out = make_recipe(tmp_path, tiny_data)
    code, _, err = cli(capsys, "train", recipe, "--set", override)
    assert message in one_line(code, err, "train")
    assert not out.exists()
