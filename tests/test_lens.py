"""The logit lens (icl.lens): its last layer is the model's real output, number tokens are digits."""

import numpy as np
import pytest

from icl import lens, tasks
from icl.runner import LlamaStack
from icl.scoring import encode, score_examples, token_logprobs


def test_number_token_mask_on_bytes(tiny_llama):
    mask = lens.number_token_mask(tiny_llama.tokenizer, tiny_llama.bridge.cfg.d_vocab)
    digits = [tiny_llama.tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    assert mask[digits].all() and int(mask.sum()) == 10
    assert not mask[tiny_llama.tokenizer.convert_tokens_to_ids("(")]


def test_last_layer_is_the_model_output(tiny_llama):
    prompts = tasks.make_prompts("plus-1", 5, 3, 0)
    res = lens.answer_lens(LlamaStack(tiny_llama.bridge), tiny_llama.tokenizer, prompts, batch_size=2)
    scores = score_examples(tiny_llama.bridge, tiny_llama.tokenizer, prompts)
    assert res.logp_answer.shape == (5, 4)
    assert np.allclose(res.logp_answer[:, -1], -scores.answer_nats[:, -1], atol=1e-4)
    # rank 0 at the last layer is "greedy decoding writes the first answer token"
    for i, p in enumerate(prompts):
        enc = encode(tiny_llama.tokenizer, p)
        first = enc.answer_tokens[-1][0]
        _, is_top = token_logprobs(tiny_llama.bridge, [enc.ids], 0)
        assert (res.rank_first[i, -1] == 0) == bool(is_top[0, first])
        assert np.isclose(np.log(res.p_first[i, -1]), float(_[0, first]), atol=1e-4)
        # the last digit is the token before ")" (single-byte tokens here)
        last = enc.answer_tokens[-1][-2]
        assert np.isclose(res.logp_last[i, -1], float(_[0, last]), atol=1e-4)
    assert (res.number_mass >= 0).all() and (res.number_mass <= 1 + 1e-6).all()


@pytest.mark.slow
def test_smollm2_identity_is_a_number_then_the_right_one(smol):
    prompts = tasks.make_prompts("identity", 6, 6, 0)
    res = lens.answer_lens(LlamaStack(smol.bridge), smol.tokenizer, prompts)
    scores = score_examples(smol.bridge, smol.tokenizer, prompts)
    assert np.allclose(res.logp_answer[:, -1], -scores.answer_nats[:, -1], atol=1e-3)
    # the copy rule is learnt: at the output the first digit is top-1 and the mass is on numbers
    assert (res.rank_first[:, -1] == 0).all() and res.number_mass[:, -1].mean() > 0.9
    # at the embedding it is neither
    assert res.number_mass[:, 0].mean() < 0.5 and res.p_first[:, 0].mean() < 0.1
