"""Task-vector and function-vector machinery on the tiny random Llama-shaped model: the edited passes
agree with the unedited runner, a head patched with its own value changes nothing, and a task vector
planted by hand at a known layer is found at that layer."""

import numpy as np
import pytest
import torch

from icl import tasks, taskvec
from icl.experiments.function_vectors import cie, matched_random
from icl.runner import LlamaStack


@pytest.fixture(scope="module")
def setup(tiny_llama):
    stack = LlamaStack(tiny_llama.bridge)
    prompts = tasks.make_prompts("plus-1", 6, 3, seed=0)
    return tiny_llama, stack, taskvec.encode_prompts(tiny_llama.tokenizer, prompts), prompts


def test_answer_positions_cover_every_answer_token(setup):
    model, _, pb, prompts = setup
    pos, tgt, valid = taskvec.answer_index(pb, range(pb.n), range(pb.k))
    for i, p in enumerate(prompts):
        ids = model.tokenizer(p.text, add_special_tokens=True)["input_ids"]
        for e, y in enumerate(p.ys):
            n_tok = int(valid[i, e].sum())
            assert model.tokenizer.decode(tgt[i, e, :n_tok].tolist()) == f"{y})"
            assert (tgt[i, e, :n_tok] == torch.tensor(ids)[pos[i, e, :n_tok] + 1]).all()
    assert (pb.pred() == pos[:, -1, 0]).all()


def test_unedited_pass_matches_the_runner(setup):
    _, stack, pb, _ = setup
    rows = list(range(pb.n))
    ids = taskvec.padded(pb, rows)
    read = pb.preds()
    final, resid = taskvec.forward_final(stack, ids, read, keep=read)
    tr = stack.forward(ids, keep=read, keep_kv=False)
    assert torch.allclose(resid, tr.resid_pre, atol=1e-5)
    assert torch.allclose(stack.logits(final), tr.logits, atol=1e-4)
    # replacing a residual with itself changes nothing; adding zero neither
    layer = 2
    same = taskvec.answer_logp(stack, pb, edit_layer=layer, vector=tr.resid_pre[layer][:, -1], mode="replace")
    assert np.allclose(same, taskvec.answer_logp(stack, pb), atol=1e-5)


def test_a_planted_task_vector_is_recovered_at_its_layer(setup):
    """"k-shot" runs are the zero-shot prompts with a large vector v added entering block ``planted`` at
    the query position. The mean residual of those runs, written over the zero-shot residual, recovers
    the whole effect from ``planted`` on and almost none of it before (v is not in the stream yet)."""
    model, stack, _, _ = setup
    zero = taskvec.encode_prompts(model.tokenizer, [tasks.prompt_from("plus-1", [x], [x + 1])
                                                    for x in range(49, 57)])  # every answer starts with 5
    five = model.tokenizer("5", add_special_tokens=False)["input_ids"][0]
    u = stack.W_U[five].float() * stack.ln_final.float()
    v = 30.0 * u / u.norm()  # the planted "task": write the first answer digit
    for planted in (1, 2):
        logp_k, resid = taskvec.answer_logp(stack, zero, edit_layer=planted, vector=v, mode="add", residuals=True)
        logp_0 = taskvec.answer_logp(stack, zero)
        tv = resid.mean(1)  # the task vector at every layer
        patched = taskvec.layer_sweep(stack, zero, tv[:-1])
        m, lo, hi = taskvec.recovered_fraction(patched, logp_k[:, 0], logp_0[:, 0], n_boot=200)
        assert abs(logp_k.mean() - logp_0.mean()) > 1.0  # the plant matters
        assert int(np.argmax(m > 0.9)) == planted and m[planted] > 0.9
        assert np.all(m[:planted] < 0.5)
        assert np.all(lo <= m + 1e-9) and np.all(m <= hi + 1e-9)


def test_the_restart_sweep_equals_full_edited_passes(setup):
    _, stack, pb, _ = setup
    torch.manual_seed(1)
    vectors = torch.randn(stack.n_layers, pb.n, stack.d_model)
    for mode in ("replace", "add"):
        fast = taskvec.layer_sweep(stack, pb, vectors, mode=mode, batch_size=4)
        for layer in range(stack.n_layers):
            slow = np.concatenate([taskvec.answer_logp(stack, taskvec.PromptBatch(pb.ids[i:i + 1], pb.answers[i:i + 1], pb.pad),
                                                       edit_layer=layer, vector=vectors[layer, i], mode=mode)[:, 0]
                                   for i in range(pb.n)])
            assert np.allclose(fast[:, layer], slow, atol=1e-4)
    runs = taskvec.suffix_runs(stack, pb, 4)
    assert np.allclose(np.concatenate([r.base for r in runs]), taskvec.answer_logp(stack, pb)[:, 0], atol=1e-5)


def test_head_patches_by_restart(setup):
    _, stack, pb, _ = setup
    one = taskvec.PromptBatch(pb.ids[:1], pb.answers[:1], pb.pad)
    ids = taskvec.padded(one, [0])
    q = one.pred()
    tr = stack.forward(ids, keep=q[:, None], keep_kv=False)
    own_z = tr.z[:, 0, 0]  # [L, H, d_head]: patching each head with its own value changes nothing
    base, patched = cie(stack, one, own_z, bs=4)
    assert np.allclose(patched, base[:, None, None], atol=1e-5)
    assert np.allclose(base, taskvec.answer_logp(stack, one)[:, 0], atol=1e-5)
    # another value for head (1, 3): the restart equals a full pass with that z edit
    other = own_z.clone()
    other[1, 3] = torch.randn(stack.d_head) * 5
    _, patched = cie(stack, one, other, bs=4)

    def edit_for(rows, where):
        def edit(layer, z):
            if layer != 1:
                return z
            z = z.clone()
            z[0, where[0], 3] = other[1, 3]
            return z
        return edit

    full = taskvec.answer_logp(stack, one, z_edit_for=edit_for)[0, 0]
    assert abs(patched[0, 1, 3] - full) < 1e-4 and abs(patched[0, 1, 3] - base[0]) > 1e-4


def test_map_heads_and_matched_random():
    mapped = taskvec.map_heads(["L10H5", "L10H7", "L13H6", "L13H27", "L14H18"], 32, 32, 30, 9)
    assert mapped == [(9, 1), (12, 1), (12, 7), (13, 5)]
    assert taskvec.map_heads(["L10H5"], 32, 32, 32, 32) == [(10, 5)]
    rng = np.random.default_rng(0)
    heads = [(3, 1), (3, 2), (5, 0)]
    rand = matched_random(heads, 4, rng)
    assert [layer for layer, _ in rand] == [3, 3, 5] and not set(rand) & set(heads) and len(set(rand)) == 3


def test_attention_from_matches_the_bridge_pattern(setup):
    model, stack, pb, _ = setup
    rows = list(range(pb.n))
    ids = taskvec.padded(pb, rows)
    preds = pb.preds()
    tr = stack.forward(ids, keep=preds, keep_kv=True)
    got = {}

    def grab(pattern, hook):
        got[hook.name] = pattern.detach()

    model.bridge.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", grab) for layer in range(2)])
    for layer in range(2):
        ours = taskvec.attention_from(stack, layer, tr.resid_pre[layer], preds, tr.k[layer])  # [R, H, K, T]
        ref = got[f"blocks.{layer}.attn.hook_pattern"]  # [R, H, T, T]
        idx = preds[:, None, :, None].expand(-1, ref.shape[1], -1, ref.shape[-1])
        assert torch.allclose(ours, torch.gather(ref, 2, idx).float(), atol=1e-5)
