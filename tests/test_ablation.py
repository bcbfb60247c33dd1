"""Head ablation through hook_z (icl.ablation) on a random GQA model: the batched last-position restarts
equal one hooked bridge run per head, sibling heads sharing a KV head are distinct, and direct effects
add up to the attention output's contribution."""

import numpy as np
import pytest
import torch

from icl import ablation, patching, tasks
from icl.runner import LlamaStack, PatchingError


@pytest.fixture(scope="module")
def setup(tiny_llama):
    prompts = [p for p in tasks.make_prompts("plus-1", 20, 3, 0) if p.xs[-1] >= 10][:3]
    pairs = patching.make_pairs(tiny_llama.tokenizer, prompts)
    return tiny_llama, LlamaStack(tiny_llama.bridge), pairs


def bridge_logp_with_head_zeroed(model, pairs, layer, head, last_only=True):
    out = []
    for i in range(pairs.n):
        ids = torch.tensor([pairs.a_ids[i]])

        def hook(z, hook):
            z = z.clone()
            if last_only:
                z[:, -1, head] = 0
            else:
                z[:, :, head] = 0
            return z

        with torch.no_grad():
            logits = model.bridge.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", hook)])
        out.append(float(torch.log_softmax(logits[0, -1], -1)[pairs.target[i]]))
    return np.array(out)


def test_last_position_ablation_equals_hooked_runs(setup):
    model, stack, pairs = setup
    clean, _ = ablation.a_runs(stack, model.tokenizer, pairs)
    res = ablation.last_position_ablation(stack, model.tokenizer, pairs, clean.z.mean(1), batch_size=2)
    assert res["zero"].shape == (3, 3, 8)
    for layer, head in [(0, 0), (1, 5), (2, 7), (2, 6)]:
        ref = bridge_logp_with_head_zeroed(model, pairs, layer, head)
        assert np.abs(res["zero"][:, layer, head] - ref).max() < 1e-4
    # heads 4..7 share KV head 1, yet ablating each is a different intervention
    assert np.abs(res["zero"][:, 2, 4] - res["zero"][:, 2, 5]).max() > 1e-6
    # mean ablation with the mean of a single prompt's own z changes nothing for that prompt
    one = patching.PatchPairs(pairs.a_ids[:1], pairs.b_ids[:1], pairs.q_len, pairs.target[:1], pairs.xs[:1], pairs.ys[:1])
    own, _ = ablation.a_runs(stack, model.tokenizer, one)
    same = ablation.last_position_ablation(stack, model.tokenizer, one, own.z[:, 0])
    assert np.allclose(same["mean"], own.logp[0], atol=1e-4)


def test_layer_synchronous_restarts_equal_one_restart_per_layer(setup):
    """The batched pass (rows of all layers together, prefix shared per prompt) gives what one
    run_suffix restart per layer gives, for both modes, prompts of different lengths and given caches."""
    model, stack, pairs = setup
    clean, caches = ablation.a_runs(stack, model.tokenizer, pairs, batch_size=2, keep_kv=True)
    mean_z = clean.z.mean(1)
    fast = ablation.last_position_ablation(stack, model.tokenizer, pairs, mean_z, caches=caches)
    ref = ablation.last_position_ablation_reference(stack, model.tokenizer, pairs, mean_z)
    assert len({len(a) for a in pairs.a_ids}) > 1  # padding is exercised
    for mode in ("zero", "mean"):
        assert np.abs(fast[mode] - ref[mode]).max() < 1e-5
    assert np.abs(fast["zero"] - fast["mean"]).max() > 1e-4


def test_zeroing_hooks_match_runner_edits(setup):
    model, stack, pairs = setup
    heads = [(1, 2), (1, 3), (2, 0)]
    with torch.no_grad():
        logits = model.bridge.run_with_hooks(torch.tensor([pairs.a_ids[0]]), fwd_hooks=ablation.zero_heads_hook(heads))
    tr = stack.forward(torch.tensor([pairs.a_ids[0]]), z_edit=ablation.zero_heads_edit(heads))
    assert torch.allclose(tr.logits, logits, atol=1e-4)
    ref = bridge_logp_with_head_zeroed(model, pairs, 1, 2, last_only=False)
    runs, _ = ablation.a_runs(stack, model.tokenizer, pairs, z_edit=ablation.zero_heads_edit([(1, 2)]))
    assert np.allclose(runs.logp, ref, atol=1e-4)


@pytest.mark.parametrize("heads", [[], [(1, 2), (1, 5), (2, 0)]])
def test_one_pass_gives_what_the_three_separate_runs_give(setup, heads):
    """a_pass (A teacher-forced through its answer, run once) returns the hooked bridge's residual stream
    at the aligned query positions and log P(first token), answer_scores' whole-answer scores and a_runs'
    z and direct effects, with heads ablated or not, over batches with padding."""
    model, stack, pairs = setup
    edit = ablation.zero_heads_edit(heads) if heads else None
    resid, scores, runs = ablation.a_pass(stack, pairs, z_edit=edit, batch_size=2)
    acts, logp = patching.a_activations(model.bridge, model.tokenizer, pairs, ["resid_pre"],
                                        fwd_hooks=ablation.zero_heads_hook(heads))
    assert resid.shape == acts["resid_pre"].shape == (stack.n_layers, pairs.n, pairs.q_len, stack.d_model)
    assert (resid - acts["resid_pre"]).abs().max() < 1e-4
    assert np.abs(runs.logp - logp.numpy()).max() < 1e-4
    ref = patching.answer_scores(stack, pairs, z_edit=edit, batch_size=3)
    for key in ("first", "answer", "last"):
        assert np.abs(getattr(scores, key) - getattr(ref, key)).max() < 1e-4
    assert (scores.exact == ref.exact).all()
    old, _ = ablation.a_runs(stack, model.tokenizer, pairs, z_edit=edit, batch_size=3)
    assert (runs.z - old.z).abs().max() < 1e-4 and np.abs(runs.direct - old.direct).max() < 1e-4
    assert np.abs(runs.logp - scores.first).max() == 0


def test_subset_of_pairs(setup):
    _, _, pairs = setup
    two = patching.subset(pairs, [2, 0])
    assert two.n == 2 and two.a_ids == (pairs.a_ids[2], pairs.a_ids[0]) and two.q_len == pairs.q_len
    assert torch.equal(two.b_ids, pairs.b_ids[[2, 0]]) and two.ys == (pairs.ys[2], pairs.ys[0])
    assert two.answer_ids == (pairs.answer_ids[2], pairs.answer_ids[0])


def test_direct_effects_sum_to_attention_output(setup):
    model, stack, pairs = setup
    ids = torch.tensor([pairs.a_ids[0]])
    T = ids.shape[1]
    tr = stack.forward(ids, keep=torch.tensor([[T - 1]]))
    de = ablation.direct_effects(stack, tr.z[:, :, 0], tr.final_scale[:, 0], pairs.target[:1])
    u = (stack.W_U[pairs.target[0]] * stack.ln_final).detach()
    for layer in range(stack.n_layers):
        total = float((tr.attn_out[layer][0, 0] * u).sum() * tr.final_scale[0, 0, 0])
        assert abs(de[0, layer].sum() - total) < 1e-4


def test_bad_heads_raise(setup):
    _, stack, _ = setup
    with pytest.raises(PatchingError):
        ablation.check_heads(stack, [(0, 8)])
    with pytest.raises(ValueError):
        ablation.check_heads(stack, [(3, 0)])


# --------------------------------------------------------------------- joint ablation of head sets
def _bridge_logp(model, ids, heads):
    """log P(next token) at every position of ``ids`` [R, T], the heads zeroed by bridge hooks."""
    with torch.no_grad():
        logits = model.bridge.run_with_hooks(ids, fwd_hooks=ablation.zero_heads_hook(heads) if heads else [])
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]  # [R, T - 1]


def test_joint_ablation_equals_hooked_bridge_runs(tiny_llama):
    stack = LlamaStack(tiny_llama.bridge)
    ids = torch.randint(0, 256, (3, 14), generator=torch.Generator().manual_seed(0))
    sets = [[], [(1, 2), (2, 5)], [(2, 0)], [(0, 7), (2, 1), (2, 2)]]
    rows = torch.arange(3).repeat_interleave(13)
    pos = torch.arange(13).repeat(3)
    got = ablation.joint_ablation_logprobs(stack, ids, rows, pos, sets)  # [4, 39]
    assert got.shape == (4, 39)
    for s, heads in enumerate(sets):
        want = _bridge_logp(tiny_llama, ids, heads).reshape(-1).numpy()
        assert np.allclose(got[s], want, atol=1e-4), heads
    # the ablations do something, and a set starting at layer 2 leaves nothing to layer 1's heads
    assert np.abs(got[1] - got[0]).max() > 1e-3 and np.abs(got[3] - got[0]).max() > 1e-3
    with pytest.raises(PatchingError):
        ablation.joint_ablation_logprobs(stack, ids, rows, pos, [[(3, 0)]])
    with pytest.raises(PatchingError):
        ablation.joint_ablation_logprobs(stack, ids, torch.tensor([0]), torch.tensor([13]), [[]])


def test_recorded_clean_run_gives_bridge_patterns_and_direct_effects(tiny_llama):
    stack = LlamaStack(tiny_llama.bridge)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    qpos = torch.tensor([9, 6])
    seen = {}

    def record(layer, x, k, z):
        if layer == stack.n_layers:
            seen["final"] = x
        else:
            seen[layer] = (x, k, z)

    ablation.joint_ablation_logprobs(stack, ids, torch.tensor([0]), torch.tensor([3]), [[(2, 1)], []], record=record)
    assert sorted(k for k in seen if k != "final") == [0, 1, 2]  # the shared blocks are recorded too
    with torch.no_grad():
        logits, cache = tiny_llama.bridge.run_with_cache(ids)
    for layer, head in ((1, 3), (2, 6)):
        x, k, _ = seen[layer]
        got = ablation.query_pattern(stack, layer, head, x, k, qpos)  # [2, 11]
        want = cache[f"blocks.{layer}.attn.hook_pattern"][torch.arange(2), head, qpos]
        assert torch.allclose(got, want, atol=1e-5)
        assert float(got[1, 7:].abs().sum()) == 0.0 and float(got[0, 10]) == 0.0  # nothing after the query
    # a head's logits through the frozen final norm: at the target, its direct effect
    xq = seen["final"][torch.arange(2), qpos].float()
    scale = torch.rsqrt(xq.pow(2).mean(-1, keepdim=True) + stack.eps)
    assert torch.allclose(stack.logits(seen["final"][torch.arange(2), qpos]), logits[torch.arange(2), qpos], atol=1e-4)
    z = torch.stack([seen[layer][2][torch.arange(2), qpos] for layer in range(3)])  # [L, 2, H, d_head]
    target = ids[torch.arange(2), qpos + 1]
    direct = ablation.direct_effects(stack, z, scale, target)  # [2, L, H]
    hl = ablation.head_logits(stack, 2, 6, z[2][:, 6], scale)  # [2, vocab]
    assert np.allclose(hl[torch.arange(2), target].numpy(), direct[:, 2, 6], atol=1e-5)
