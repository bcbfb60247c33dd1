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


# --------------------------------------------------------------------------- whole answers
def _teacher_forced(bridge, ids, lens, answers, fwd_hooks=(), last_digit=None):
    """Reference: whole-answer scores of right-padded ``ids`` whose answers start after ``lens`` tokens,
    from one hooked bridge forward."""
    with torch.inference_mode():
        logits = bridge.run_with_hooks(ids, fwd_hooks=list(fwd_hooks))
    logp = torch.log_softmax(logits.float(), -1)
    out = []
    for r, (n0, ans) in enumerate(zip(lens, answers)):
        rows = [logp[r, n0 - 1 + j] for j in range(len(ans))]
        tok = [float(row[t]) for row, t in zip(rows, ans)]
        exact = all(int(row.argmax()) == t for row, t in zip(rows, ans))
        out.append((tok[0], sum(tok), tok[len(ans) - 2 if last_digit is None else last_digit[r]], exact))
    return np.array(out, dtype=np.float64)


@pytest.fixture(scope="module")
def answer_setup(tiny_llama):
    # 2x+3 on two-digit x: answers of two and of three digit tokens, so padding is exercised
    prompts = [p for p in tasks.make_prompts("double-plus-3", 60, 4, 1) if p.xs[-1] >= 10]
    two = [p for p in prompts if p.ys[-1] < 100][:2]
    three = [p for p in prompts if p.ys[-1] >= 100][:2]
    pairs = patching.make_pairs(tiny_llama.tokenizer, two + three)
    # "y)" in single-byte tokens: two or three digits and the parenthesis; the last digit comes before it
    assert sorted({len(a) for a in pairs.answer_ids}) == [3, 4]
    assert [len(a) - 2 for a in pairs.answer_ids] == list(pairs.last_digit)
    assert all(model_digit == ")" for model_digit in
               (tiny_llama.tokenizer.decode([a[-1]]) for a in pairs.answer_ids))
    acts, logp_a = patching.a_activations(tiny_llama.bridge, tiny_llama.tokenizer, pairs, batch_size=2)
    return tiny_llama, LlamaStack(tiny_llama.bridge), pairs, acts, logp_a


def _b_extended(pairs):
    M = max(len(a) for a in pairs.answer_ids)
    rows = [pairs.b_ids[i].tolist() + list(a[:-1]) + [a[-1]] * (M - len(a)) for i, a in enumerate(pairs.answer_ids)]
    return torch.tensor(rows), pairs.b_ids.shape[1]


def test_whole_answer_grid_equals_hooked_teacher_forced_runs(answer_setup):
    model, stack, pairs, acts, _ = answer_setup
    grid = patching.fast_patch(stack, pairs, acts, ["resid_pre"], whole_answer=True)
    first_only = patching.fast_patch(stack, pairs, acts, ["resid_pre"])
    assert np.abs(grid.answer["resid_pre"].first - first_only.logp["resid_pre"]).max() < 1e-4
    ids, T = _b_extended(pairs)
    off = T - pairs.q_len
    ref_b = _teacher_forced(model.bridge, ids, [T] * pairs.n, pairs.answer_ids)
    got_b = np.stack([grid.answer_b.first, grid.answer_b.answer, grid.answer_b.last, grid.answer_b.exact], 1)
    assert np.abs(got_b - ref_b).max() < 1e-4
    for layer in range(stack.n_layers):
        for qpos in range(pairs.q_len):
            def setter(act, hook, layer=layer, qpos=qpos):
                act = act.clone()
                act[:, off + qpos] = acts["resid_pre"][layer, :, qpos]
                return act
            ref = _teacher_forced(model.bridge, ids, [T] * pairs.n, pairs.answer_ids,
                                  [(f"blocks.{layer}.hook_resid_pre", setter)])
            a = grid.answer["resid_pre"]
            got = np.stack([a.first[:, layer, qpos], a.answer[:, layer, qpos], a.last[:, layer, qpos],
                            a.exact[:, layer, qpos]], 1)
            assert np.abs(got - ref).max() < 1e-4, (layer, qpos)
    # the whole answer is not the first token: the later tokens add to it
    assert (grid.answer["resid_pre"].answer < grid.answer["resid_pre"].first - 1e-3).all()


def test_answer_scores_of_a_equal_the_bridge(answer_setup):
    model, stack, pairs, _, logp_a = answer_setup
    got = patching.answer_scores(stack, pairs, batch_size=3)
    assert np.abs(got.first - logp_a.numpy()).max() < 1e-4
    seqs = [list(a) + list(ans[:-1]) for a, ans in zip(pairs.a_ids, pairs.answer_ids)]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    ref = _teacher_forced(model.bridge, ids, [len(a) for a in pairs.a_ids], pairs.answer_ids)
    assert np.abs(np.stack([got.first, got.answer, got.last, got.exact], 1) - ref).max() < 1e-4


def test_heads_ablated_in_b_as_in_a(answer_setup):
    from icl import ablation

    model, stack, pairs, acts, _ = answer_setup
    heads = [(1, 0), (1, 3)]
    edit = ablation.zero_heads_edit(heads)
    grid = patching.fast_patch(stack, pairs, acts, ["resid_pre"], whole_answer=True, z_edit=edit)
    plain = patching.fast_patch(stack, pairs, acts, ["resid_pre"], whole_answer=True)
    ids, T = _b_extended(pairs)
    off = T - pairs.q_len
    hooks = ablation.zero_heads_hook(heads)
    ref_b = _teacher_forced(model.bridge, ids, [T] * pairs.n, pairs.answer_ids, hooks)
    assert np.abs(grid.answer_b.answer - ref_b[:, 1]).max() < 1e-4
    assert np.abs(grid.answer_b.answer - plain.answer_b.answer).max() > 1e-3  # the edit does something
    layer, qpos = 0, pairs.q_len - 1  # a patch before the ablated layer: B runs through it ablated

    def setter(act, hook):
        act = act.clone()
        act[:, off + qpos] = acts["resid_pre"][layer, :, qpos]
        return act
    ref = _teacher_forced(model.bridge, ids, [T] * pairs.n, pairs.answer_ids,
                          hooks + [(f"blocks.{layer}.hook_resid_pre", setter)])
    assert np.abs(grid.answer["resid_pre"].answer[:, layer, qpos] - ref[:, 1]).max() < 1e-4
    got = patching.answer_scores(stack, pairs, z_edit=edit)
    seqs = [list(a) + list(ans[:-1]) for a, ans in zip(pairs.a_ids, pairs.answer_ids)]
    width = max(len(s) for s in seqs)
    ref_a = _teacher_forced(model.bridge, torch.tensor([s + [0] * (width - len(s)) for s in seqs]),
                            [len(a) for a in pairs.a_ids], pairs.answer_ids, hooks)
    assert np.abs(got.answer - ref_a[:, 1]).max() < 1e-4
