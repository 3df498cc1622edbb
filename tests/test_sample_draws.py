"""The decoding loop draws each row's uniforms ahead (one call per row, not per row and step); this must
give exactly the per-step stream, so that samples written before and after the change are the same.
Also covers the rare path where a draw rounds up to the total mass."""

from __future__ import annotations

import pytest

from character_em.sampling import hf as S

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("seed", [0, 7416529139303639627, 2**63 - 1])
def test_drawn_ahead_equals_drawn_per_step(seed: int) -> None:
    gens = [torch.Generator().manual_seed(seed + i) for i in range(3)]
    ahead = S._draw_uniforms(gens, 600)
    for i in range(3):
        g = torch.Generator().manual_seed(seed + i)
        per_step = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for _ in range(600)])
        assert torch.equal(ahead[i], per_step)
        assert torch.equal(gens[i].get_state(), g.get_state())


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_pick_tokens_same_with_uniforms_or_generators(top_p: float) -> None:
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(1))
    by_gen = S._pick_tokens(logits, [torch.Generator().manual_seed(i) for i in range(16)], 1.0, top_p)
    u = S._draw_uniforms([torch.Generator().manual_seed(i) for i in range(16)], 1)[:, 0]
    assert S._pick_tokens(logits, None, 1.0, top_p, uniforms=u) == by_gen


def test_draw_rounding_up_to_the_total_takes_the_last_token_with_mass() -> None:
    # A uniform of 1.0 puts x exactly on the total: searchsorted runs past the end of the vocabulary.
    probs = torch.tensor([[0.2, 0.5, 0.3, 0.0], [0.0, 0.6, 0.0, 0.4]])
    logits = probs.log()
    one = torch.ones(2, dtype=torch.float64)
    assert S._pick_tokens(logits, None, 1.0, 1.0, uniforms=one) == [2, 3]
    # With top_p the kept tokens are sorted by probability: the last kept one is the least likely kept.
    assert S._pick_tokens(logits, None, 1.0, 0.75, uniforms=one) == [2, 3]
    assert S._pick_tokens(logits, None, 1.0, 0.5, uniforms=one) == [1, 1]
