"""The architectures msllm knows: one line each. Everything that needs the list, or one
architecture's knowledge, asks here (`ARCHS`, `spec(name)`); docs/extending.md adds one."""

from __future__ import annotations

from msllm.models.bottom_up import BOTTOM_UP
from msllm.models.retina import RETINA
from msllm.models.spec import ArchSpec
from msllm.models.top_down import TOP_DOWN
from msllm.models.vanilla import VANILLA

SPECS: dict[str, ArchSpec] = {s.name: s for s in (VANILLA, BOTTOM_UP, TOP_DOWN, RETINA)}
ARCHS: tuple[str, ...] = tuple(SPECS)
ARCH_CONFIGS: dict[str, type] = {name: s.config for name, s in SPECS.items()}


def spec(name: str) -> ArchSpec:
    """The ArchSpec of architecture `name` (ValueError naming the known ones otherwise)."""
    if name not in SPECS:
        raise ValueError(f"unknown architecture {name!r} (known: {', '.join(ARCHS)})")
    return SPECS[name]
