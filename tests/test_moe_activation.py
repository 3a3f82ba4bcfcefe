"""The cache-blocked activation computes exactly what the plain activation computes."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import ACT2FN

from moescope.moe.activation import BlockedActivation, block_activations


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1000, 3072), (3, 700, 768), (45, 64), (4096, 96)])
@pytest.mark.parametrize("name", ["gelu_new", "gelu", "relu"])
def test_blocked_values_and_gradients_are_bit_identical(threads: int, shape: tuple, name: str) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        x = torch.randn(shape) * 3
        g = torch.randn(shape)
        plain, blocked = ACT2FN[name], BlockedActivation(ACT2FN[name], block_bytes=2**16)  # many blocks
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = plain(xa), blocked(xb)
        assert torch.equal(ya, yb)
        ya.backward(g)
        yb.backward(g)
        assert torch.equal(xa.grad, xb.grad)
    finally:
        torch.set_num_threads(before)


def test_blocks_cover_every_row_once() -> None:
    seen = []
    act = BlockedActivation(torch.nn.Identity(), block_bytes=64 * 4 * 8)  # 64 rows of 8 floats
    act.fn = type("Spy", (torch.nn.Module,), {"forward": lambda self, t: (seen.append(t.shape[0]), t)[1]})()
    x = torch.arange(200 * 8, dtype=torch.float32).view(200, 8)
    assert torch.equal(act(x), x)
    assert seen == [64, 64, 64, 8]


def test_block_activations_keeps_a_gpt2_model_bit_identical() -> None:
    cfg = GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=2, n_inner=4096)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 97, (3, 64))
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(ids).logits
    assert block_activations(model) == 2
    assert block_activations(model) == 0  # idempotent
    assert all(isinstance(b.mlp.act, BlockedActivation) for b in model.transformer.h)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
