"""`msllm` for the launcher tests that signal a training (MSLLM_MODULE=held_train): msllm.cli,
except that just before optimizer step MSLLM_HOLD_BEFORE_STEP every rank prints `WAITING FOR A
SIGNAL BEFORE STEP N` and waits (up to 120 s) until a stop signal has reached it. A test that
signals once that line is in the job's log knows the run stops after exactly step N; a run that
resumes past N (the requeued job) never waits."""

from __future__ import annotations

import os
import sys

from fixtures.train import wait_for_a_signal_before_step

# The same patch the unit tests hand to `msllm` as python_code (tests/fixtures/train.py).
exec(wait_for_a_signal_before_step(int(os.environ["MSLLM_HOLD_BEFORE_STEP"])))

from msllm.cli import main  # noqa: E402

sys.exit(main())
