"""Bottom-up's own config fields (set flat in the model section: `model.final_layers`, ...) and
their checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from msllm.config import ArchConfig, doc


@dataclass
class BottomUpConfig(ArchConfig):
    arch = "bottom_up"
    multi_scale = True
    mixers = ("attention", "mamba2")
    dynamic_pool = True

    final_layers: int = doc(1, "Bottom-up: local-attention layers at token resolution after the scales are combined.")
    aggregation: Literal["sum", "attention"] = doc(
        "sum", "Bottom-up: combine the scales at each position by a sum or a small attention."
    )
    residual_proj: bool | None = doc(
        None,
        "Bottom-up: pass the output of the coarsest scale's finer scale (H-Net's encoder output) "
        "through a linear map (weight and bias zero-initialised, computed in fp32) where it joins the "
        "other scales, as H-Net adds residual_proj(encoder output) to the dechunked output "
        "(goombalab/hnet hnet/models/hnet.py; its bias keeps torch's default init there, ours starts at "
        "zero). null: on when a scale is dynamic, off otherwise (the scales are summed as they are).",
    )
    stage_norms: bool | None = doc(
        None,
        "Bottom-up: an RMSNorm at the end of each scale's layers, as H-Net ends each stage network "
        "(encoder, main network, decoder) with one (goombalab/hnet hnet/modules/isotropic.py); the "
        "final layers (the decoder) already end with the model's norm. null: on when a scale is "
        "dynamic, off otherwise.",
    )

    def validate(self, model, recipe, fail) -> None:
        if self.final_layers < 0:
            fail("model.final_layers", f"must not be negative, got {self.final_layers}")

    def extra_layers(self) -> int:
        return self.final_layers

    def uses_residual_proj(self, model) -> bool:
        """residual_proj resolved (null: on with a dynamic scale)."""
        return model.has_dynamic_scale() if self.residual_proj is None else self.residual_proj

    def uses_stage_norms(self, model) -> bool:
        """stage_norms resolved (null: on with a dynamic scale)."""
        return model.has_dynamic_scale() if self.stage_norms is None else self.stage_norms
