import pytest
import torch

from rollmill.algos.anchor import (
    amplify_advantages,
    anchor_credit_gate,
    fai,
    split_heads_by_distance,
    top_fraction_gate,
    waad,
)

# docs/algorithms.md §4.5 worked example: one head, five tokens, causal rows.
SPEC_ATTN = torch.tensor(
    [
        [1.0, 0, 0, 0, 0],
        [0.5, 0.5, 0, 0, 0],
        [0.7, 0.1, 0.2, 0, 0],
        [0.1, 0.1, 0.1, 0.7, 0],
        [0.6, 0.1, 0.1, 0.1, 0.1],
    ]
)


def _random_causal(*shape: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    L = shape[-1]
    logits = torch.randn(*shape, L, generator=gen)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, float("-inf")).softmax(-1)


def test_waad_worked_example():
    assert waad(SPEC_ATTN, window=3).tolist() == pytest.approx([0, 0.5, 1.5, 0.6, 2.4], abs=1e-6)


def test_waad_window_clips_distance():
    assert waad(SPEC_ATTN, window=1).tolist() == pytest.approx([0, 0.5, 0.8, 0.3, 0.9], abs=1e-6)
    assert waad(SPEC_ATTN, window=4).tolist() == pytest.approx([0, 0.5, 1.5, 0.6, 3.0], abs=1e-6)


def test_fai_worked_example():
    assert fai(SPEC_ATTN).tolist() == pytest.approx([0.475, 0.1, 0.1, 0.1, 0], abs=1e-6)


def test_fai_valid_excludes_padded_rows():
    # Row 4 is padding: s=0 loses its 0.6 vote, s=3 is left with no later valid row.
    valid = torch.tensor([True, True, True, True, False])
    assert fai(SPEC_ATTN, valid).tolist() == pytest.approx([1.3 / 3, 0.1, 0.1, 0, 0], abs=1e-6)
    assert fai(SPEC_ATTN, valid.float()).tolist() == pytest.approx([1.3 / 3, 0.1, 0.1, 0, 0], abs=1e-6)


def test_leading_dims_pass_through():
    attn = _random_causal(2, 3, 5)
    attn[1, 2] = SPEC_ATTN
    w, f = waad(attn, window=3), fai(attn)
    assert w.shape == f.shape == (2, 3, 5)
    for b in range(2):
        for h in range(3):
            assert torch.allclose(w[b, h], waad(attn[b, h], window=3))
            assert torch.allclose(f[b, h], fai(attn[b, h]))
    assert w[1, 2].tolist() == pytest.approx([0, 0.5, 1.5, 0.6, 2.4], abs=1e-6)
    # A per-sample valid mask broadcasts over heads.
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])[:, None, :]
    assert fai(attn, valid)[1, 2].tolist() == pytest.approx([1.3 / 3, 0.1, 0.1, 0, 0], abs=1e-6)
    assert torch.allclose(fai(attn, valid)[0], f[0])


def test_bf16_attention_is_summed_in_float32():
    out = waad(SPEC_ATTN.to(torch.bfloat16), window=3)
    assert out.dtype == torch.float32


def test_split_heads_by_distance():
    L = 4
    diagonal = torch.eye(L)
    first = torch.zeros(L, L)
    first[:, 0] = 1.0
    attn = torch.stack([first, diagonal, diagonal])[None]  # [1, 3, L, L]
    local, global_ = split_heads_by_distance(attn, torch.ones(1, L))
    assert local.tolist() == [False, True, True]
    assert global_.tolist() == [True, False, False]


def test_split_heads_single_head_or_all_tied_is_both():
    attn = torch.eye(4)[None, None]
    local, global_ = split_heads_by_distance(attn, torch.ones(1, 4))
    assert local.tolist() == global_.tolist() == [True]
    local, global_ = split_heads_by_distance(attn.expand(2, 2, 4, 4), torch.ones(2, 4))
    assert local.tolist() == global_.tolist() == [True, True]


def test_split_heads_ignores_invalid_rows():
    # Head 0 only looks far back on row 3; once row 3 is padding both heads have distance 0 (tie).
    far = torch.eye(4)
    far[3] = torch.tensor([1.0, 0, 0, 0])
    attn = torch.stack([far, torch.eye(4)])[None]
    assert split_heads_by_distance(attn, torch.ones(1, 4))[1].tolist() == [True, False]
    assert split_heads_by_distance(attn, torch.tensor([[1, 1, 1, 0]]))[1].tolist() == [True, True]


def test_gate_picks_top_fraction_with_ties_earliest_first():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9, 0.3]])
    mask = torch.ones(1, 5)
    assert top_fraction_gate(scores, mask, 0.4).tolist() == [[0, 1, 0, 1, 0]]
    assert top_fraction_gate(scores, mask, 0.2).tolist() == [[0, 1, 0, 0, 0]]
    assert top_fraction_gate(scores, mask, 0.5).tolist() == [[0, 1, 1, 1, 0]]  # ceil(2.5) = 3


def test_gate_skips_masked_positions():
    mask = torch.tensor([[0, 1, 1, 1]])
    assert top_fraction_gate(torch.tensor([[5.0, 1, 2, 3]]), mask, 0.5).tolist() == [[0, 0, 1, 1]]
    # A masked position tied with valid ones and earlier than them still never takes a slot.
    assert top_fraction_gate(torch.ones(1, 4), mask, 0.34).tolist() == [[0, 1, 1, 0]]


def test_gate_q_one_empty_row_and_mixed_rows():
    scores = torch.tensor([[3.0, 1, 2, 0], [1.0, 2, 3, 4], [9.0, 9, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert top_fraction_gate(scores, mask, 1.0).tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    assert top_fraction_gate(scores, mask, 0.3).tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]


def test_gate_count_is_not_inflated_by_float_error():
    # 0.07 * 100 is 7.000000000000001 in floating point; the gate must still select 7, not 8.
    assert top_fraction_gate(torch.zeros(1, 100), torch.ones(1, 100), 0.07).sum().item() == 7


@pytest.mark.parametrize("q", [0.0, -0.1, 1.5])
def test_gate_rejects_q_outside_unit_interval(q):
    with pytest.raises(ValueError, match="q must be"):
        top_fraction_gate(torch.zeros(1, 3), torch.ones(1, 3), q)


def test_amplify_both_signs_and_positive_only():
    adv = torch.tensor([1.0, -2.0])
    gate = torch.tensor([[1.0, 0, 1], [1, 1, 0]])
    assert amplify_advantages(adv, gate, 0.5).tolist() == [[1.5, 1, 1.5], [-3, -3, -2]]
    assert amplify_advantages(adv, gate, 0.5, positive_only=True).tolist() == [[1.5, 1, 1.5], [-2, -2, -2]]


def test_amplify_token_level_advantages():
    adv = torch.tensor([[1.0, -1.0, 0.0, 2.0]])
    gate = torch.tensor([[1.0, 1, 1, 0]])
    assert amplify_advantages(adv, gate, 2.0).tolist() == [[3, -3, 0, 2]]
    assert amplify_advantages(adv, gate, 2.0, positive_only=True).tolist() == [[3, -1, 0, 2]]


def _anchor_example() -> torch.Tensor:
    """Two heads over 6 tokens (2 prompt + 4 completion). Head 0 is local (diagonal) except that token 4
    looks 3 back to token 1: a preplan spike. Head 1 is global: every row from 3 on attends to token 3,
    earlier rows to token 0, so token 3 is the anchor."""
    local = torch.eye(6)
    local[4] = torch.tensor([0, 1.0, 0, 0, 0, 0])
    global_ = torch.zeros(6, 6)
    global_[:3, 0] = 1.0
    global_[3:, 3] = 1.0
    return torch.stack([local, global_])[None].expand(2, 2, 6, 6)


def test_anchor_credit_gate_modes_pick_preplan_and_anchor_tokens():
    attn = _anchor_example()
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    region = slice(2, 6)
    waad_gate = anchor_credit_gate(attn, valid, region, "waad", window=3, q=0.25)
    fai_gate = anchor_credit_gate(attn, valid, region, "fai", window=3, q=0.25)
    both = anchor_credit_gate(attn, valid, region, "preplan_anchor", window=3, q=0.25)
    assert waad_gate.shape == fai_gate.shape == both.shape == (2, 4)
    assert waad_gate.tolist() == [[0, 0, 1, 0], [0, 0, 1, 0]]
    assert fai_gate.tolist() == [[0, 1, 0, 0], [0, 1, 0, 0]]
    assert both.tolist() == [[0, 1, 1, 0], [0, 1, 1, 0]]


@pytest.mark.parametrize("mode", ["waad", "fai", "preplan_anchor"])
def test_anchor_credit_gate_is_zero_outside_valid(mode):
    attn = _random_causal(2, 3, 8)
    valid = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]])
    region = slice(3, 8)
    gate = anchor_credit_gate(attn, valid, region, mode, window=2, q=1.0)
    assert gate.shape == (2, 5)
    assert gate.tolist() == valid[:, region].float().tolist()
    gate = anchor_credit_gate(attn, valid, region, mode, window=2, q=0.5)
    assert (gate[valid[:, region] == 0] == 0).all()
    assert set(gate.unique().tolist()) <= {0.0, 1.0}


def test_anchor_credit_gate_rejects_unknown_mode():
    with pytest.raises(ValueError, match="unknown anchor mode"):
        anchor_credit_gate(_anchor_example(), torch.ones(2, 6), slice(2, 6), "anchors", window=3, q=0.5)
