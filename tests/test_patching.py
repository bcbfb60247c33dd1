"""Fast patching (icl.patching.fast_patch) equals TransformerLens's generic_activation_patch on a random
GQA Llama-3-shaped model and on SmolLM2, and bad requests fail clearly."""

import numpy as np
import pytest
import torch

from icl import patching, tasks
from icl.runner import LlamaStack, PatchingError


def two_digit(task, n, k=4, seed=0):
    return [p for p in tasks.make_prompts(task, 4 * n, k, seed) if p.xs[-1] >= 10][:n]


@pytest.fixture(scope="module")
def tiny_setup(tiny_llama):
    pairs = patching.make_pairs(tiny_llama.tokenizer, two_digit("double-plus-3", 3))
    acts, logp_a = patching.a_activations(tiny_llama.bridge, tiny_llama.tokenizer, pairs, batch_size=2)
    return tiny_llama, LlamaStack(tiny_llama.bridge), pairs, acts, logp_a


def test_pairs_are_aligned_from_the_end(tiny_setup):
    model, _, pairs, acts, _ = tiny_setup
    assert pairs.q_len == 5 and pairs.b_ids.shape == (3, 5)  # "(", two digits, ",", " " (bytes)
    for a, b in zip(pairs.a_ids, pairs.b_ids.tolist()):
        assert list(a[-5:]) == b
    assert acts["resid_pre"].shape == (3, 3, 5, 64)
    # the first layer's input is the token embedding: identical tokens give identical activations
    emb = model.bridge.embed.original_component.weight[pairs.b_ids]
    assert torch.allclose(acts["resid_pre"][0], emb)


@pytest.mark.parametrize("kind", patching.KINDS)
def test_fast_equals_transformer_lens(tiny_setup, kind):
    model, stack, pairs, acts, _ = tiny_setup
    fast = patching.fast_patch(stack, pairs, acts, [kind])
    ref = patching.reference_patch(model.bridge, pairs, acts, kind)
    assert fast.logp[kind].shape == (3, 3, 5)
    assert np.abs(fast.logp[kind] - ref).max() < 1e-4
    assert np.abs(ref - fast.logp_b[:, None, None]).max() > 1e-3  # the patches do something


def test_embedding_patch_changes_nothing(tiny_setup):
    _, stack, pairs, acts, _ = tiny_setup
    grid = patching.fast_patch(stack, pairs, acts, ["resid_pre"], layers=[0])
    assert np.allclose(grid.logp["resid_pre"][:, 0, :], grid.logp_b[:, None], atol=1e-5)


def test_out_of_range_requests_raise(tiny_setup):
    _, stack, pairs, acts, _ = tiny_setup
    with pytest.raises(PatchingError, match="layers"):
        patching.fast_patch(stack, pairs, acts, ["resid_pre"], layers=[3])
    with pytest.raises(ValueError, match="positions"):
        patching.fast_patch(stack, pairs, acts, ["resid_pre"], positions=[5])
    with pytest.raises(PatchingError):
        patching.fast_patch(stack, pairs, acts, ["embed"])


def test_mismatched_query_alignment_raises(tiny_llama):
    mixed = tasks.make_prompts("identity", 40, 3, 0)
    assert {len(str(p.xs[-1])) for p in mixed} == {1, 2}
    with pytest.raises(PatchingError, match="different token lengths"):
        patching.make_pairs(tiny_llama.tokenizer, mixed)
    with pytest.raises(PatchingError):
        patching.make_pairs(tiny_llama.tokenizer, [])


def test_recovered_is_zero_at_b_and_one_at_a():
    lp_a, lp_b = np.array([-1.0, -2.0]), np.array([-5.0, -6.0])
    assert patching.recovered(lp_b[:, None], lp_a, lp_b)[0] == 0
    assert patching.recovered(lp_a[:, None], lp_a, lp_b)[0] == 1


@pytest.mark.slow
def test_smollm2_fast_equals_reference_on_a_few_cells(smol):
    pairs = patching.make_pairs(smol.tokenizer, two_digit("plus-1", 3, k=8))
    assert pairs.q_len == 5 and smol.n_kv_heads == 3 and smol.n_heads == 9
    acts, logp_a = patching.a_activations(smol.bridge, smol.tokenizer, pairs)
    stack = LlamaStack(smol.bridge)
    for kind, layer in (("resid_pre", 17), ("attn_out", 20), ("mlp_out", 29)):
        fast = patching.fast_patch(stack, pairs, acts, [kind], layers=[layer], positions=[4])
        ref = patching.reference_patch(smol.bridge, pairs, acts, kind, layers=[layer], positions=[4])
        assert np.abs(fast.logp[kind] - ref).max() < 1e-4
    # the model learns x + 1 in context: A is confident, B much less so
    assert logp_a.mean() > -0.7 and fast.logp_b.mean() < logp_a.mean() - 1
