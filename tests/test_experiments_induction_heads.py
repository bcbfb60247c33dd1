"""The induction_heads experiment: on the real model the repeat is predicted and the book's heads are
found; on the random model the pipeline runs with GQA-expanded circuits."""

import inspect
import itertools

import numpy as np
import pytest
import torch

from icl import experiments, heads
from icl.experiments import induction_heads as exp
from icl.runner import LlamaStack


def test_gqa_circuits_expand_kv_heads(tiny_llama):
    stack = LlamaStack(tiny_llama.bridge)
    circuits = exp.gqa_circuits(stack)
    assert inspect.isgenerator(circuits)  # one layer at a time, never all layers' circuits at once
    W_V, W_O = next(circuits)
    assert W_V.shape == (8, 64, 8) and W_O.shape == (8, 8, 64)
    assert torch.equal(W_V[0], W_V[3]) and not torch.equal(W_V[3], W_V[4])  # heads 0-3 share KV head 0
    assert not torch.equal(W_O[0], W_O[1])


def test_copying_via_model_width_product_equals_full_circuit(tiny_llama):
    stack = LlamaStack(tiny_llama.bridge)
    W_V, W_O = next(itertools.islice(exp.gqa_circuits(stack), 1, None))
    W_E, W_U = stack.W_E.detach().double(), stack.W_U.detach().double().T
    full = heads.copying_score(W_E, W_V, W_O, W_U)
    small = heads.copying_score(torch.eye(stack.d_model, dtype=torch.float64), W_V, W_O, W_U @ W_E)
    assert torch.allclose(full, small, atol=1e-5)


def _unembed_embed_at_once(stack):
    """The product as the experiment formed it before it was blocked: all vocabulary rows at once."""
    W_E = stack.W_E.double()
    W_E = W_E * torch.rsqrt(W_E.pow(2).mean(-1, keepdim=True) + stack.eps)
    W_U = (stack.W_U.double() * stack.ln_final.double()[None]).T
    return (W_U @ W_E).cpu()


def test_unembed_embed_in_blocks_equals_the_product_over_the_whole_vocabulary(tiny_llama):
    stack = LlamaStack(tiny_llama.bridge)
    vocab, d_model = stack.W_E.shape
    whole = _unembed_embed_at_once(stack)
    assert whole.shape == (d_model, d_model) and whole.dtype == torch.float64
    # one block (the default for a small vocabulary): the same operations, so the same bits
    assert torch.equal(exp.unembed_embed(stack), whole)
    # blocks of 50 rows (an uneven last block): float64 summation order only
    blocked = exp.unembed_embed(stack, block_bytes=8 * d_model * 50)
    assert -(-vocab // 50) >= 5 and not torch.equal(blocked, torch.zeros_like(blocked))
    assert torch.allclose(blocked, whole, rtol=1e-12, atol=1e-12 * whole.abs().max().item())
    assert exp.UE_BLOCK_BYTES // (8 * 4096) == 8192  # Llama-3-8B: 16 blocks of 8,192 rows, 256 MiB each


def test_runs_on_random_model(tiny_llama):
    params = experiments.make_params(exp, {"n_seqs": "3", "half": "10", "tasks": "identity", "n_prompts": "2",
                                           "k": "3", "token_low": "0", "token_high": "256", "n_boot": "50"})
    arrays, data = exp.compute(params, tiny_llama)
    assert arrays["prefix_matching"].shape == arrays["copying"].shape == (3, 8)
    assert arrays["identity.to_answers"].shape == (3, 8)
    assert (arrays["identity.to_first_answer_token"] <= arrays["identity.to_answers"] + 1e-6).all()
    # the values, recomputed another way: one cached bridge pass over all repeated sequences
    tok, bridge = tiny_llama.tokenizer, tiny_llama.bridge
    bos = list(tok("", add_special_tokens=True)["input_ids"])
    ids = torch.cat([torch.tensor([bos] * params.n_seqs, dtype=torch.long).reshape(params.n_seqs, len(bos)),
                     torch.tensor(exp.random_tokens(params), dtype=torch.long)], 1)
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    loss = -torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    assert np.allclose(arrays["loss_per_token.mean"], loss.mean(0).numpy(), atol=1e-5)
    for layer in range(3):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert np.allclose(arrays["prefix_matching"][layer], heads.prefix_matching_score(pattern, ids), atol=1e-5)
        assert np.allclose(arrays["previous_token"][layer], heads.previous_token_score(pattern), atol=1e-5)
    half = loss[:, len(bos):len(bos) + params.half - 1].mean()
    assert data["loss_first_half"][0] == pytest.approx(float(half), abs=1e-5)


@pytest.mark.slow
def test_smollm2_predicts_the_repeat(smol):
    params = experiments.make_params(exp, {"n_seqs": "3", "half": "30", "tasks": "identity", "n_prompts": "2",
                                           "k": "4", "n_boot": "50"})
    arrays, data = exp.compute(params, smol)
    assert data["loss_first_half"][0] > 8 and data["loss_second_half"][0] < 5
    top = {(layer, head) for layer, head, _ in data["top_prefix_matching"][:6]}
    assert (18, 6) in top  # the book's strongest induction head
    assert data["top_previous_token"][0][2] > 0.5
