"""viewer.json content: per-sample tokens, experts and probabilities in block order."""

from __future__ import annotations

import numpy as np
import pytest

from moescope.analysis.table import RoutingTable
from moescope.analysis.viewer import choose_sample_rows, viewer_arm


def table_for(expert_of_position: np.ndarray, shuffle_seed: int) -> RoutingTable:
    """Blocks 10 (domain 0) and 11 (domain 1), 3 tokens each, rows in shuffled order."""
    block = np.repeat([10, 11], 3)
    position = np.tile(np.arange(3), 2)
    expert = expert_of_position[block - 10, position]
    probs = np.full((6, 4), 0.1)
    probs[np.arange(6), expert] = 0.7
    order = np.random.default_rng(shuffle_seed).permutation(6)
    return RoutingTable(
        token_id=np.arange(6)[order], block=block[order], position=position[order], domain=(block - 10)[order],
        expert_index=expert[order, None], gate_weight=np.ones((6, 1))[order], router_probs=probs[order],
    )


def test_viewer_arm_orders_tokens_by_position() -> None:
    layer2 = table_for(np.array([[0, 1, 2], [3, 3, 0]]), 0)
    layer3 = table_for(np.array([[1, 1, 1], [2, 0, 2]]), 1)
    pieces = {10: ["def", " f", "()"], 11: ["The", " cat", "."]}
    arm = viewer_arm({3: layer3, 2: layer2}, [10, 11], ["code", "prose"], pieces)
    assert arm["layers"] == [2, 3] and arm["n_experts"] == 4
    first, second = arm["samples"]
    assert first["domain"] == "code" and first["tokens"] == ["def", " f", "()"]
    assert first["experts"] == {"2": [0, 1, 2], "3": [1, 1, 1]}
    assert second["experts"] == {"2": [3, 3, 0], "3": [2, 0, 2]}
    assert second["probs"]["2"] == pytest.approx([0.7, 0.7, 0.7])
    assert second["text_id"] == "prose:eval-block-11"
    with pytest.raises(ValueError, match="block 12"):
        viewer_arm({2: layer2}, [12], ["code", "prose"], {12: ["x"]})
    with pytest.raises(ValueError, match="token texts"):
        viewer_arm({2: layer2}, [10], ["code", "prose"], {10: ["x"]})


def test_choose_sample_rows() -> None:
    rows = np.arange(20, 30)
    domain = np.array([0] * 6 + [1] * 4)
    assert choose_sample_rows(rows, domain, 3) == [20, 22, 25, 26, 28, 29]  # numpy rounds halves to even
    assert choose_sample_rows(rows, domain, 10) == list(range(20, 30))


def test_viewer_topk_packing_and_dominant_domains() -> None:
    from report_fixtures import planted_table

    from moescope.analysis.viewer import expert_domains, unpack_topk

    tables = {layer: planted_table(layer) for layer in (3, 7)}
    pieces = {row: [f"t{j}" for j in range(48)] for row in range(10)}
    arm = viewer_arm(tables, [0, 1], [f"d{i}" for i in range(5)], pieces, max_tokens=20)
    assert arm["top_k"] == 8 and arm["n_experts"] == 64 and arm["layers"] == [3, 7]
    sample = arm["samples"][1]  # block 1, domain 1
    assert len(sample["tokens"]) == 20 and "experts" not in sample  # the first choice is topk's first column
    ids, weights = unpack_topk(sample["topk"]["7"], sample["topk_weights"]["7"], 8, 64)
    t = tables[7]
    rows = np.flatnonzero(t.block == 1)[:20]
    np.testing.assert_array_equal(ids, t.expert_index[rows])
    np.testing.assert_allclose(weights, t.gate_weight[rows], atol=0.5 / 255 + 1e-7)
    # planted: domain d owns experts 8d .. 8d+7
    dominant, share = expert_domains(t, 5)
    np.testing.assert_array_equal(dominant[:40], np.repeat(np.arange(5), 8))
    assert arm["expert_domain"]["7"] == dominant.tolist()
    assert (share[:40] > 0.5).all() and (share <= 1).all()


def test_expert_choice_unrouted_tokens_from_capture_to_viewer(tmp_path) -> None:
    """Expert choice, capacity factor 0.75: per token and layer the analysis keeps how many experts took it
    (0 = unrouted), equal to the layer's own selection; summary and viewer report the same unrouted share."""
    import torch
    from test_analysis_pipeline import write_data
    from transformers import GPT2Config, GPT2LMHeadModel

    from moescope.analysis.capture import capture_routing, load_table, save_table, select_eval_rows
    from moescope.analysis.summary import SummaryConfig, summarize_layer
    from moescope.data.blocks import BlockStore
    from moescope.moe.capture import record_routing
    from moescope.moe.config import MoEConfig
    from moescope.moe.install import install_moe
    from moescope.moe.model import moe_layers

    tokenizer = write_data(tmp_path / "data")
    store = BlockStore.open(tmp_path / "data")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=64, vocab_size=len(tokenizer)))
    install_moe(model, MoEConfig(n_experts=4, top_k=1, layers=[0, 1], routing="expert_choice", capacity_factor=0.75))
    for layer in moe_layers(model).values():
        torch.nn.init.normal_(layer.router.weight, std=1.0)
    model.eval()
    rows = select_eval_rows(store)
    res = capture_routing(model, store, rows=rows, batch_blocks=4, progress=False)

    # the layers' own selection, forward by forward over the same batches
    index = store.index("eval")
    taken = {i: [] for i in res.tables}
    unrouted_counts = {i: 0 for i in res.tables}
    with torch.no_grad(), record_routing(model) as rec:
        for s in range(0, rows.size, 4):
            model(input_ids=torch.from_numpy(store.gather("eval", index[rows[s:s + 4]])))
            for i, record in rec.latest().items():
                taken[i].append(record.expert_mask.sum(-1).numpy())
                unrouted_counts[i] += int(record.unrouted)
    summaries = {}
    for i, table in res.tables.items():
        mine = np.concatenate(taken[i])
        np.testing.assert_array_equal(table.experts_per_token, mine)
        np.testing.assert_array_equal(table.unrouted(), mine == 0)
        assert int(table.unrouted().sum()) == unrouted_counts[i]
        assert table.unrouted().any() and (mine >= 2).any()  # some tokens taken by none, some by several
        # an unrouted token's stored entry is its router's first choice with gate 0; a routed one has a gate
        assert (table.gate_weight[table.unrouted(), 0] == 0).all() and (table.gate_weight[~table.unrouted(), 0] > 0).all()
        # the column survives the routing-table file
        np.testing.assert_array_equal(load_table(save_table(table, tmp_path / f"{i}.npz")).experts_per_token, mine)
        summaries[i] = summarize_layer(table, store.domains, SummaryConfig(n_resamples=50, n_permutations=19))
        load = summaries[i]["load"]
        assert load["unrouted_fraction"]["estimate"] == pytest.approx(unrouted_counts[i] / table.n_tokens, abs=1e-12)
        assert load["unrouted_fraction"]["low"] <= load["unrouted_fraction"]["estimate"] <= load["unrouted_fraction"]["high"]
        assert load["experts_per_token_counts"] == np.bincount(mine, minlength=5).tolist()

    sample_rows = [int(rows[0]), int(rows[-1])]
    pieces = {r: [f"t{j}" for j in range(store.block_size)] for r in sample_rows}
    arm = viewer_arm(res.tables, sample_rows, store.domains, pieces)
    assert arm["routing"] == "expert_choice"
    for i, table in res.tables.items():
        assert arm["unrouted_fraction"][str(i)] == pytest.approx(summaries[i]["load"]["unrouted_fraction"]["estimate"],
                                                                  abs=1e-4)
        for r, sample in zip(sample_rows, arm["samples"]):
            own = table.experts_per_token[table.block == r][np.argsort(table.position[table.block == r])]
            assert sample["experts_per_token"][str(i)] == own.tolist()
            assert len(sample["experts"][str(i)]) == len(sample["tokens"])


def test_token_choice_viewer_has_no_expert_choice_keys() -> None:
    layer2 = table_for(np.array([[0, 1, 2], [3, 3, 0]]), 0)
    arm = viewer_arm({2: layer2}, [10, 11], ["code", "prose"], {10: ["a", "b", "c"], 11: ["d", "e", "f"]})
    assert layer2.unrouted() is None
    assert not {"routing", "unrouted_fraction"} & set(arm)
    assert all("experts_per_token" not in s for s in arm["samples"])
