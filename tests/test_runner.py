"""The restartable Llama runner (icl.runner) reproduces the bridge exactly, per query head (GQA), and
restarting from any layer/position with cached keys and values gives the full pass's logits."""

import pytest
import torch

from icl.runner import LlamaStack, PatchingError, UnsupportedModelError


@pytest.fixture(scope="module")
def tiny_stack(tiny_llama):
    return LlamaStack(tiny_llama.bridge)


def test_shapes_are_gqa(tiny_llama, tiny_stack):
    assert (tiny_stack.n_heads, tiny_stack.n_kv, tiny_stack.n_rep) == (8, 2, 4)
    assert tiny_stack.device == torch.device(tiny_llama.bridge.cfg.device)


def _z_by_hand(stack, ids, kv_of):
    """Layer 0's per-query-head attention output, one head at a time, query head h reading the key/value
    head kv_of(h)."""
    w = stack.layers[0]
    T = ids.shape[1]
    h = stack.rms(torch.nn.functional.embedding(ids, stack.W_E), w.ln1)
    cos, sin = stack.rotary(torch.arange(T)[None].expand(ids.shape[0], T))
    q = (h @ w.W_q.T).view(*ids.shape, stack.n_heads, stack.d_head).transpose(1, 2)
    k = (h @ w.W_k.T).view(*ids.shape, stack.n_kv, stack.d_head).transpose(1, 2)
    v = (h @ w.W_v.T).view(*ids.shape, stack.n_kv, stack.d_head).transpose(1, 2)
    q, k = stack._rope(q, cos, sin), stack._rope(k, cos, sin)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    zs = []
    for head in range(stack.n_heads):
        scores = (q[:, head] @ k[:, kv_of(head)].transpose(-1, -2)) * stack.scaling
        pattern = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
        zs.append(pattern @ v[:, kv_of(head)])
    return torch.stack(zs, 2)  # [rows, pos, head, d_head]


def test_query_heads_read_their_groups_kv_head(tiny_stack):
    """Grouped-query attention by value: query head h attends with key/value head h // n_rep, as Hugging
    Face's model does; the other natural mapping (h % n_kv) gives different outputs."""
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        z = tiny_stack.forward(ids).z[0]
        grouped = _z_by_hand(tiny_stack, ids, lambda h: h // tiny_stack.n_rep)
        interleaved = _z_by_hand(tiny_stack, ids, lambda h: h % tiny_stack.n_kv)
    assert torch.allclose(z, grouped, atol=1e-5)
    assert not torch.allclose(z, interleaved, atol=1e-3)


def test_forward_matches_bridge_logits_and_hook_z(tiny_llama, tiny_stack):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (3, 17), generator=g)
    with torch.inference_mode():
        ref, cache = tiny_llama.bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_z"))
    tr = tiny_stack.forward(ids)
    assert torch.allclose(tr.logits, ref, atol=1e-5)
    for layer in range(tiny_stack.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"]
        assert z.shape[-2] == 8  # one vector per query head, not per KV head
        assert torch.allclose(tr.z[layer], z, atol=1e-5)
    assert tr.k.shape == (tiny_stack.n_layers, 3, 2, 17, tiny_stack.d_head)


@pytest.mark.parametrize("layer,pos,stage", [(0, 0, "attn"), (1, 9, "attn"), (2, 16, "mlp"), (3, 5, "attn")])
def test_restart_reproduces_full_pass(tiny_stack, layer, pos, stage):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 17), generator=g)
    tr = tiny_stack.forward(ids)
    resid = (tr.resid_mid[layer] if stage == "mlp" else tr.resid_pre[layer])[:, pos:]
    final = tiny_stack.run_suffix(layer, resid, torch.tensor([pos, pos]), tr.k[:, :, :, :pos], tr.v[:, :, :, :pos],
                                  stage=stage)
    assert torch.allclose(tiny_stack.logits(final), tr.logits[:, -1], atol=1e-4)


def test_editing_one_head_changes_only_later_positions(tiny_stack):
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))

    def kill(layer, z):
        if layer == 1:
            z = z.clone()
            z[:, 6:, 3] = 0
        return z

    a, b = tiny_stack.forward(ids), tiny_stack.forward(ids, z_edit=kill)
    assert torch.equal(a.logits[:, :6], b.logits[:, :6])
    assert (a.logits[:, 6:] - b.logits[:, 6:]).abs().max() > 1e-3
    assert torch.equal(b.z[1][:, 6:, 3], torch.zeros_like(b.z[1][:, 6:, 3]))


def test_bad_restarts_and_models_raise(tiny_stack):
    x = torch.zeros(1, 2, tiny_stack.d_model)
    with pytest.raises(PatchingError):
        tiny_stack.run_suffix(tiny_stack.n_layers + 1, x, torch.tensor([0]), None, None)
    with pytest.raises(ValueError):
        tiny_stack.run_suffix(tiny_stack.n_layers, x, torch.tensor([0]), None, None, stage="mlp")

    class NotLlama:
        cfg = None
        original_model = None

    with pytest.raises(UnsupportedModelError):
        LlamaStack(NotLlama())
