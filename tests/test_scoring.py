import math

import numpy as np
import pytest
import torch

from icl import tasks
from icl.models import byte_tokenizer
from icl.scoring import encode, score_examples


class UniformBridge:
    """Every next token equally likely: each answer token costs exactly log(V) nats."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.vocab)


class OracleBridge:
    """Puts almost all mass on the true next token (it peeks at the input): surprisal ~0, exact match."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, self.vocab)
        logits[:, :-1].scatter_(-1, ids[:, 1:, None], 50.0)
        return logits


@pytest.fixture(scope="module")
def byte_tok():
    return byte_tokenizer()


def test_encode_covers_whole_answer_with_byte_tokenizer(byte_tok):
    p = tasks.make_prompts("double-plus-3", 1, 6, seed=0)[0]
    enc = encode(byte_tok, p)
    for y, toks in zip(p.ys, enc.answer_tokens):
        assert byte_tok.decode([enc.ids[t] for t in toks]) == f"{y})"


@pytest.mark.slow
def test_encode_covers_whole_answer_with_smollm2_tokenizer(smol):
    p = tasks.make_prompts("double-plus-3", 1, 8, seed=0)[0]
    enc = encode(smol.tokenizer, p)
    for y, toks in zip(p.ys, enc.answer_tokens):
        assert smol.tokenizer.decode([enc.ids[t] for t in toks]) == f"{y})"
        assert len(toks) == len(str(y)) + 1  # one token per digit, plus ")"


@pytest.mark.slow
def test_negative_answers_are_scored_over_all_their_tokens_with_smollm2(smol):
    """" -" is one SmolLM2 token: a negative answer is scored from that token on (its space included,
    which the line format fixes), then one token per digit and ")"; positive answers are unchanged."""
    tok = smol.tokenizer
    minus = tok(" -", add_special_tokens=False)["input_ids"]
    assert len(minus) == 1
    signs = set()
    for p in tasks.make_prompts("affine:-2,50", 4, 8, seed=0):
        enc = encode(tok, p)
        for y, toks in zip(p.ys, enc.answer_tokens):
            signs.add(y < 0)
            if y < 0:
                assert enc.ids[toks[0]] == minus[0] and tok.decode([enc.ids[t] for t in toks]) == f" {y})"
                assert len(toks) == 1 + len(str(-y)) + 1
            else:
                assert tok.decode([enc.ids[t] for t in toks]) == f"{y})" and len(toks) == len(str(y)) + 1
    assert signs == {True, False}


def test_negative_answers_cost_log_vocab_per_token_with_the_byte_tokenizer(byte_tok):
    prompts = tasks.make_prompts("affine:-1,0", 2, 5, seed=0)
    s = score_examples(UniformBridge(len(byte_tok)), byte_tok, prompts, batch_size=2)
    assert np.array_equal(s.answer_len, [[len(f"{y})") for y in p.ys] for p in prompts])  # "-", digits, ")"
    assert np.allclose(s.answer_nats, s.answer_len * math.log(len(byte_tok)), atol=1e-4)


def test_uniform_model_costs_log_vocab_per_answer_token(byte_tok):
    prompts = tasks.make_prompts("plus-10", 3, 5, seed=0)
    vocab = len(byte_tok)
    s = score_examples(UniformBridge(vocab), byte_tok, prompts, batch_size=2)
    expected = s.answer_len * math.log(vocab)
    assert np.allclose(s.answer_nats, expected, atol=1e-4)
    lines = np.array([[len(f"({x}, {y})\n") for x, y in zip(p.xs, p.ys)] for p in prompts])
    lines[:, 0] -= 1  # the very first token has no prediction
    assert np.allclose(s.line_nats, lines * math.log(vocab), atol=1e-3)


def test_oracle_model_is_exact_and_unsurprised(byte_tok):
    prompts = tasks.make_prompts("double", 3, 5, seed=0)
    s = score_examples(OracleBridge(len(byte_tok)), byte_tok, prompts, batch_size=3)
    assert s.exact.all()
    assert np.all(s.answer_nats < 1e-6 * 10)


@pytest.mark.slow
def test_answer_inside_a_token_is_rejected(smol):
    p = tasks.make_prompts("identity", 1, 3, seed=0)[0]
    # "hello" is a single SmolLM2 token, so a span starting at character 2 starts inside it.
    text = "hello" + p.text
    off = len("hello")
    bad = tasks.Prompt(p.task, p.xs, p.ys, text, tuple((a + off, b + off) for a, b in p.line_spans),
                       ((2, 5),) + tuple((a + off, b + off) for a, b in p.answer_spans[1:]))
    with pytest.raises(ValueError, match="token boundary"):
        encode(smol.tokenizer, bad)


def test_batching_does_not_change_scores(tiny_llama):
    prompts = tasks.make_prompts("double-plus-3", 5, 6, seed=3)  # different lengths -> padding
    one = score_examples(tiny_llama.bridge, tiny_llama.tokenizer, prompts, batch_size=1)
    many = score_examples(tiny_llama.bridge, tiny_llama.tokenizer, prompts, batch_size=5)
    assert np.allclose(one.answer_nats, many.answer_nats, atol=1e-4)
    assert np.array_equal(one.exact, many.exact)
