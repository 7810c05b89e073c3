"""The lab's tests (tests/lab): the experiments in the repository's lab/ folder, which is not part
of the installed package; it is imported from the checkout these tests are in."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
