"""Retina's own config fields (set flat in the model section: `model.retina_levels`,
`model.retina_factor`) and their checks."""

from __future__ import annotations

from dataclasses import dataclass

from msllm.config import ArchConfig, doc


@dataclass
class RetinaConfig(ArchConfig):
    arch = "retina"

    retina_levels: int = doc(3, "Retina: number of levels S (fine window plus S-1 pooled levels).")
    retina_factor: int = doc(4, "Retina: block factor k between levels (blocks of k, k^2, ...).")

    def validate(self, model, recipe, fail) -> None:
        if self.retina_levels < 1:
            fail("model.retina_levels", f"must be at least 1, got {self.retina_levels}")
        if self.retina_factor < 1:
            fail("model.retina_factor", f"must be at least 1, got {self.retina_factor}")
        if self.retina_factor < 2:
            fail("model.retina_factor", f"must be at least 2, got {self.retina_factor}")
        sp = recipe.parallel.sp
        block = self.retina_factor ** (self.retina_levels - 1)
        if sp > 1 and (recipe.data.seq_len // sp) % block:
            fail(
                "parallel.sp",
                f"retina's coarsest blocks of {block} tokens must not straddle ranks: "
                f"data.seq_len/sp = {recipe.data.seq_len // sp} is not a multiple of {block}",
            )

    def reads_window(self, scale) -> bool:
        """The fine level takes scales[0].window whatever the scale's attention says."""
        return True
