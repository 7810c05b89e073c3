"""H-Net's training ingredients as recipe options (issue 35): the zero-initialised fp32 residual
projection, the norms at the end of each scale's layers, the embedding init std and the per-scale
learning-rate multipliers; each on by default with a dynamic scale, off otherwise."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from msllm.config import ModelConfig, ScaleConfig, from_dict, validate
from msllm.errors import RecipeError
from msllm.models import build_model
from msllm.train.engine import build_optimizer, build_scheduler, lr_multipliers, param_groups, param_names

DYNAMIC = [ScaleConfig(1, 1, "local", 8), ScaleConfig(1, 1, "full", pool="dynamic", target_ratio=4.0)]
FIXED = [ScaleConfig(1, 1, "local", 8), ScaleConfig(4, 1, "full")]


def cfg(scales, **overrides) -> ModelConfig:
    return ModelConfig(
        arch="bottom_up", vocab_size=97, d_model=32, n_heads=2, scales=scales, final_layers=1, **overrides
    )


def test_the_ingredients_are_on_with_a_dynamic_scale_and_off_otherwise():
    dynamic, fixed = build_model(cfg(DYNAMIC), seed=0), build_model(cfg(FIXED), seed=0)
    assert dynamic.residual_proj is not None and len(dynamic.scale_norms) == 2
    assert fixed.residual_proj is None and fixed.scale_norms is None
    assert cfg(DYNAMIC).default_lr_multipliers() == [2.0, 1.0] and cfg(FIXED).default_lr_multipliers() is None
    # the embeddings: std 1.0 (H-Net's) with a dynamic scale, init_std otherwise
    assert dynamic.embed.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert fixed.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert fixed.scales[0][0].attn.wq.weight.std().item() == pytest.approx(0.02, rel=0.1)
    off = build_model(cfg(DYNAMIC, residual_proj=False, stage_norms=False, embed_init_std=0.02), seed=0)
    assert off.residual_proj is None and off.scale_norms is None
    assert off.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    on = build_model(cfg(FIXED, residual_proj=True, stage_norms=True), seed=0)
    assert on.residual_proj is not None and on.scale_norms is not None


def test_a_fixed_model_keeps_its_weights_bit_for_bit():
    """The rules changed nothing for the models without a dynamic scale: the same seed gives the
    same weights as the plain normal(0, init_std) draw by name (msllm.models.init)."""
    from msllm.models.init import _generator

    model = build_model(cfg(FIXED), seed=7)
    expected = torch.empty(model.embed.weight.shape).normal_(0.0, 0.02, generator=_generator(7, "embed.weight"))
    assert torch.equal(model.embed.weight, expected)


def test_the_residual_projection_starts_at_zero_learns_and_computes_in_fp32():
    torch.manual_seed(0)
    model = build_model(cfg(DYNAMIC), seed=0)
    assert not model.residual_proj.weight.any() and not model.residual_proj.bias.any()
    ids = torch.randint(0, 97, (2, 24))
    model(ids).square().mean().backward()
    assert model.residual_proj.weight.grad.abs().sum() > 0 and model.residual_proj.bias.grad.abs().sum() > 0
    # at zero the token scale reaches the sum only through the projection: nothing
    per_scale = [torch.randn(2, 5, 32), torch.randn(2, 5, 32)]
    torch.testing.assert_close(model.combine(per_scale), per_scale[1])
    with torch.no_grad():
        model.residual_proj.weight.normal_(0, 0.1)
        model.residual_proj.bias.normal_(0, 0.1)
    expected = per_scale[0] @ model.residual_proj.weight.T + model.residual_proj.bias + per_scale[1]
    torch.testing.assert_close(model.combine(per_scale), expected)
    # in a bf16 model the projection and the sum run in fp32; only the result is rounded to bf16
    low = model.bfloat16()
    inputs = [x.bfloat16() for x in per_scale]
    precise = (
        inputs[0].float() @ low.residual_proj.weight.float().T + low.residual_proj.bias.float() + inputs[1].float()
    )
    out = low.combine(inputs)
    assert out.dtype == torch.bfloat16 and torch.equal(out, precise.bfloat16())


def test_the_stage_norms_end_each_scale():
    model = build_model(cfg(DYNAMIC), seed=0)
    seen = []
    for norm in model.scale_norms:
        norm.register_forward_hook(lambda module, inputs, output: seen.append(output))
    model(torch.randint(0, 97, (1, 16)))
    assert len(seen) == 2
    for out in seen:  # unit RMS (the gains start at one)
        torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(out.shape[:-1]), rtol=1e-3, atol=1e-3)


def test_without_multipliers_the_groups_are_the_two_of_before():
    model = build_model(cfg(FIXED), seed=0)
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and all("lr" not in g for g in groups)
    named = dict(model.named_parameters())
    decay = [n for n, p in named.items() if p.ndim >= 2]
    assert param_names(model) == decay + [n for n, p in named.items() if p.ndim < 2]
    assert [id(p) for g in groups for p in g["params"]] == [id(named[n]) for n in param_names(model)]


def test_multipliers_make_a_group_per_decay_and_scale_with_its_rate():
    recipe = from_dict(
        {
            "model": dataclasses.asdict(cfg(DYNAMIC)),
            "train": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2, "max_steps": 10},
        }
    )
    model = build_model(recipe.model, seed=0)
    assert lr_multipliers(recipe) == [2.0, 1.0]  # H-Net's rule at target_ratio 4: sqrt(4), 1
    optimizer = build_optimizer(model, recipe, "cpu")
    groups = optimizer.param_groups
    assert [(g["weight_decay"], g["scale"]) for g in groups] == [(0.1, 0), (0.1, 1), (0.0, 0), (0.0, 1)]
    assert [g["lr"] for g in groups] == [2e-3, 1e-3, 2e-3, 1e-3]
    named = dict(model.named_parameters())
    # the order param_names gives (what checkpoint conversion indexes the optimizer state by)
    assert [id(p) for g in groups for p in g["params"]] == [id(named[n]) for n in param_names(model)]
    assert sorted(param_names(model)) == sorted(named)
    where = {n: g["scale"] for g in groups for n in named if any(p is named[n] for p in g["params"])}
    assert (
        where["scales.1.0.attn.wq.weight"] == 1
        and where["scale_norms.1.weight"] == 1
        and where["scale_norms.0.weight"] == 0
    )
    assert (
        where["pools.0.wq.weight"] == 0 and where["residual_proj.weight"] == 0
    )  # H-Net: the router and the residual in the outer stage
    assert where["embed.weight"] == 0 and where["lm_head.weight"] == 0 and where["final.0.attn.wq.weight"] == 0
    # the schedule scales each group's own rate: warmup, then down to min_lr times the multiplier
    scheduler = build_scheduler(optimizer, recipe.train)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(
        [1e-3, 5e-4, 1e-3, 5e-4]
    )  # step 0 of 2 warmup steps
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2e-4, 1e-4, 2e-4, 1e-4])


def test_given_multipliers_override_h_nets_and_a_fixed_model_has_none():
    r = from_dict(
        {
            "model": {"arch": "bottom_up", "scales": [{"attention": "local"}, {"factor": 4}]},
            "train": {"lr_multipliers": [3.0, 0.5]},
        }
    )
    validate(r)
    assert lr_multipliers(r) == [3.0, 0.5]
    plain = from_dict({"model": {"arch": "bottom_up", "scales": [{"attention": "local"}, {"factor": 4}]}})
    assert lr_multipliers(plain) is None
    ones = from_dict({"model": dataclasses.asdict(cfg(DYNAMIC)), "train": {"lr_multipliers": [1.0, 1.0]}})
    assert lr_multipliers(ones) is None  # opting out: the two groups of before, as an older dynamic run has
    three = cfg([ScaleConfig(1, 1, "local", 8), ScaleConfig(2, 1), ScaleConfig(1, 1, pool="dynamic", target_ratio=3.0)])
    assert three.default_lr_multipliers() == pytest.approx([math.sqrt(6), math.sqrt(3), 1.0])


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"train": {"lr_multipliers": [1.0]}}, "one multiplier per scale"),
        ({"train": {"lr_multipliers": [1.0, 0.0]}}, "must be positive"),
        ({"model": {"arch": "top_down", "residual_proj": True}}, "bottom_up only"),
        ({"model": {"arch": "top_down", "stage_norms": True}}, "bottom_up only"),
        ({"model": {"embed_init_std": 0.0}}, "must be positive"),
    ],
)
def test_bad_ingredient_settings_fail_with_one_line(raw, message):
    base = {"model": {"arch": "bottom_up", "scales": [{"attention": "local"}, {"factor": 4}]}, "data": {"seq_len": 64}}
    for section, values in raw.items():
        base[section] = {**base.get(section, {}), **values}
    with pytest.raises(RecipeError, match=message) as info:
        validate(from_dict(base))
    assert "\n" not in str(info.value)
