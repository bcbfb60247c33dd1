"""The induction_heads experiment: on the real model the repeat is predicted and the book's heads are
found; on the random model the pipeline runs with GQA-expanded circuits."""

import numpy as np
import pytest
import torch

from icl import experiments, heads
from icl.experiments import induction_heads as exp
from icl.runner import LlamaStack


def test_gqa_circuits_expand_kv_heads(tiny_llama):
    stack = LlamaStack(tiny_llama.bridge)
    (W_V, W_O), *_ = exp.gqa_circuits(stack)
    assert W_V.shape == (8, 64, 8) and W_O.shape == (8, 8, 64)
    assert torch.equal(W_V[0], W_V[3]) and not torch.equal(W_V[3], W_V[4])  # heads 0-3 share KV head 0
    assert not torch.equal(W_O[0], W_O[1])


def test_copying_via_model_width_product_equals_full_circuit(tiny_llama):
    stack = LlamaStack(tiny_llama.bridge)
    W_V, W_O = exp.gqa_circuits(stack)[1]
    W_E, W_U = stack.W_E.detach().double(), stack.W_U.detach().double().T
    full = heads.copying_score(W_E, W_V, W_O, W_U)
    small = heads.copying_score(torch.eye(stack.d_model, dtype=torch.float64), W_V, W_O, W_U @ W_E)
    assert torch.allclose(full, small, atol=1e-5)


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
