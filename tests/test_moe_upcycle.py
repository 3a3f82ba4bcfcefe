"""Drop-Upcycling and relative noise: which hidden units change, from what distribution, seeded."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from moescope.errors import MoescopeError
from moescope.moe.config import MoEConfig
from moescope.moe.install import install_moe
from moescope.moe.upcycle import add_relative_noise, dropped_units, resample_units


def test_dropped_units_are_distinct_sorted_and_sized():
    gen = torch.Generator().manual_seed(0)
    units = dropped_units(512, 0.5, gen)
    assert units.numel() == 256 and units.unique().numel() == 256
    assert torch.equal(units, units.sort().values) and 0 <= int(units.min()) and int(units.max()) < 512
    assert dropped_units(512, 0.0, gen).numel() == 0
    assert torch.equal(dropped_units(7, 1.0, gen), torch.arange(7))
    with pytest.raises(ValueError):
        dropped_units(8, 1.5, gen)


def test_resample_units_replaces_only_chosen_slices_with_matching_statistics():
    gen = torch.Generator().manual_seed(1)
    value = torch.randn(64, 400) * 0.3 + 2.0
    units = torch.tensor([3, 10, 200])
    out = resample_units(value, units, 1, gen)
    keep = torch.ones(400, dtype=torch.bool)
    keep[units] = False
    assert torch.equal(out[:, keep], value[:, keep])
    fresh = out[:, units]
    assert not torch.equal(fresh, value[:, units])
    assert abs(float(fresh.mean()) - float(value.mean())) < 0.05
    assert abs(float(fresh.std()) - float(value.std())) < 0.05


def test_relative_noise_scale_and_identity_at_zero():
    gen = torch.Generator().manual_seed(2)
    value = torch.randn(200, 200) * 0.5
    assert add_relative_noise(value, 0.0, gen) is value
    noisy = add_relative_noise(value, 0.1, gen)
    assert abs(float((noisy - value).std()) - 0.1 * float(value.std())) < 0.005


def _tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2))


def test_drop_upcycling_reinitializes_exactly_the_chosen_hidden_units_per_expert():
    model = _tiny_gpt2()
    dense = model.transformer.h[1].mlp
    w_fc, b_fc, w_proj, b_proj = (p.detach().clone() for p in (dense.c_fc.weight, dense.c_fc.bias,
                                                               dense.c_proj.weight, dense.c_proj.bias))
    ff = w_fc.shape[1]
    layer = install_moe(model, MoEConfig(n_experts=4, layers=[1], upcycle_noise_rel=0.0, upcycle_reinit_ratio=0.25))[1]
    changed_sets = []
    for expert in layer.experts:
        changed = (expert.c_fc.weight != w_fc).any(0)
        assert int(changed.sum()) == round(0.25 * ff)
        # a unit's input column, bias and output row are redrawn together; all else is copied
        assert torch.equal((expert.c_proj.weight != w_proj).any(1), changed)
        assert torch.equal(expert.c_fc.bias[~changed], b_fc[~changed])
        assert torch.equal(expert.c_proj.bias, b_proj)
        assert torch.equal(expert.c_fc.weight[:, ~changed], w_fc[:, ~changed])
        changed_sets.append(changed)
    assert not all(torch.equal(changed_sets[0], c) for c in changed_sets[1:])


def test_drop_upcycling_is_seeded_and_ratio_validated():
    a = install_moe(_tiny_gpt2(), MoEConfig(n_experts=2, layers=[0], upcycle_reinit_ratio=0.5), seed=3)[0]
    b = install_moe(_tiny_gpt2(), MoEConfig(n_experts=2, layers=[0], upcycle_reinit_ratio=0.5), seed=3)[0]
    c = install_moe(_tiny_gpt2(), MoEConfig(n_experts=2, layers=[0], upcycle_reinit_ratio=0.5), seed=4)[0]
    assert torch.equal(a.experts[1].c_fc.weight, b.experts[1].c_fc.weight)
    assert not torch.equal(a.experts[1].c_fc.weight, c.experts[1].c_fc.weight)
    with pytest.raises(MoescopeError, match="upcycle_reinit_ratio"):
        MoEConfig(upcycle_reinit_ratio=1.5)
