"""The attention-only toy transformer and its data (icl.toymodels)."""

import dataclasses

import numpy as np
import pytest
import torch

from icl import toymodels as tm


def test_markov_repeat_data_structure_and_determinism():
    spec = tm.MarkovRepeatSpec(vocab=32, n_ctx=64)
    data = tm.MarkovRepeatData(spec, seed=3)
    assert torch.allclose(data.transition.sum(1), torch.ones(32))
    assert ((data.transition > 0).sum(1) == spec.n_successors).all()
    toks, lens = data.sample(256, torch.Generator().manual_seed(0))
    again, lens2 = data.sample(256, torch.Generator().manual_seed(0))
    assert torch.equal(toks, again) and torch.equal(lens, lens2)
    assert 0.35 < (lens > 0).float().mean() < 0.65
    assert ((lens == 0) | ((lens >= spec.min_len) & (lens < spec.max_len))).all()
    for row, L in zip(toks, lens.tolist()):
        if L:
            assert torch.equal(row[:L], row[L:2 * L])
        # after the repeat (or from the start) every transition is one the chain allows
        for t in range(max(2 * L, 1), spec.n_ctx):
            assert data.transition[row[t - 1], row[t]] > 0


def test_model_shapes_cache_and_ablation():
    cfg = tm.AttnOnlyConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, vocab=16, n_ctx=20)
    model = tm.AttnOnlyTransformer(cfg, generator=torch.Generator().manual_seed(0))
    x = torch.randint(16, (3, 20), generator=torch.Generator().manual_seed(1))
    logits, cache = model(x, return_cache=True)
    assert logits.shape == (3, 20, 16)
    assert len(cache["pattern"]) == 2 and cache["pattern"][0].shape == (3, 4, 20, 20)
    assert torch.allclose(cache["pattern"][1].sum(-1), torch.ones(3, 4, 20))
    assert torch.all(cache["pattern"][0].triu(1) == 0)  # causal
    # the residual stream is the sum of the embeddings and every head's output
    resid = cache["resid"][0] + sum(o.sum(1) for o in cache["head_out"])
    assert torch.allclose(resid @ model.W_U + model.b_U, logits, atol=1e-5)
    # ablating every head leaves the direct path; a mask of ones changes nothing
    ones = model(x, head_mask=torch.ones(2, 4))
    assert torch.allclose(ones, logits)
    none = model(x, head_mask=torch.zeros(2, 4))
    direct = (model.W_E[x] + model.W_pos[:20]) @ model.W_U + model.b_U
    assert torch.allclose(none, direct, atol=1e-6)
    # mean ablation with the head's own mean on a one-sequence batch reproduces that sequence
    means = model.head_means(x[:1])
    assert torch.allclose(model(x[:1], head_mask=torch.zeros(2, 4), head_mean=means), logits[:1], atol=1e-5)


def test_state_round_trip():
    cfg = tm.AttnOnlyConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, vocab=8, n_ctx=8)
    a = tm.AttnOnlyTransformer(cfg, generator=torch.Generator().manual_seed(0))
    arrays = tm.state_arrays(a, "m.")
    b = tm.load_state_arrays(tm.AttnOnlyTransformer(cfg), arrays, "m.")
    x = torch.randint(8, (2, 8))
    assert torch.equal(a(x), b(x))
    assert all(v.dtype == np.float32 for v in arrays.values())


def test_training_is_deterministic_and_learns_bigrams():
    torch.set_num_threads(1)
    data = tm.MarkovRepeatData(tm.MarkovRepeatSpec(vocab=16, n_ctx=16, p_repeat=0.0), seed=0)
    cfg = tm.AttnOnlyConfig(n_layers=1, d_model=32, n_heads=2, d_head=16, vocab=16, n_ctx=16)
    runs = []
    for _ in range(2):
        model = tm.AttnOnlyTransformer(cfg, generator=torch.Generator().manual_seed(0))
        losses = tm.train(model, lambda g: data.sample(32, g)[0], steps=150, lr=1e-2, seed=0)
        runs.append((losses, model))
    assert runs[0][0] == runs[1][0]
    # a chain with 4 successors per token: the loss falls from log 16 towards the bigram entropy
    assert runs[0][0][0] > 2.5 and np.mean(runs[0][0][-20:]) < data.bigram_entropy + 0.4


def test_repeated_random_tokens():
    x = tm.repeated_random_tokens(4, 7, 10, torch.Generator().manual_seed(0))
    assert x.shape == (4, 14) and torch.equal(x[:, :7], x[:, 7:])


def test_fast_forward_is_the_same_function_as_the_per_head_path():
    """Training and plain evaluation use fused QKV + scaled_dot_product_attention; the per-head path
    (taken with return_cache or head_mask) is the reference, for outputs and for gradients."""
    import torch

    from icl import toymodels as tm

    cfg = tm.AttnOnlyConfig(vocab=32, n_ctx=24, d_model=32, n_heads=4, d_head=8, n_layers=2)
    model = tm.AttnOnlyTransformer(cfg, torch.Generator().manual_seed(3))
    tokens = torch.randint(0, 32, (5, 24), generator=torch.Generator().manual_seed(4))
    ref, _ = model(tokens, return_cache=True)
    fast = model(tokens)
    assert torch.allclose(fast, ref, atol=1e-5, rtol=1e-5)
    grads = []
    for out in (lambda: model(tokens, return_cache=True)[0], lambda: model(tokens)):
        model.zero_grad()
        tm.next_token_loss(out(), tokens).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g_ref, g_fast in zip(*grads):
        assert torch.allclose(g_fast, g_ref, atol=1e-6, rtol=1e-4)


def test_chains_forward_equals_one_forward_per_copy():
    """C copies of the weights in one batched pass give each copy's own forward."""
    from icl import toymodels as tm

    cfg = tm.AttnOnlyConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, vocab=11, n_ctx=12)
    nets = [tm.AttnOnlyTransformer(cfg, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    for net in nets:
        torch.nn.init.normal_(net.b_U, std=0.1, generator=torch.Generator().manual_seed(9))
    tokens = torch.randint(0, 11, (4, 12), generator=torch.Generator().manual_seed(1))
    params = {k: torch.stack([dict(n.named_parameters())[k] for n in nets]) for k, _ in nets[0].named_parameters()}
    with torch.no_grad():
        batched = nets[0].chains_forward(params, tokens)
        for c, net in enumerate(nets):
            assert torch.allclose(batched[c], net(tokens), atol=1e-5)
        assert not torch.allclose(batched[0], batched[1], atol=1e-3)


def test_smeared_keys_mix_each_key_with_the_previous_one():
    """sigma(alpha) k_t + (1 - sigma(alpha)) k_{t-1}, per head; position 0 keeps its own key; the fast
    path, the per-head path and chains_forward agree on a smeared model."""
    k = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(0))  # [batch, head, pos, d_head]
    alpha = torch.tensor([0.0, 2.0, -1.0])
    out = tm.smear_keys(k, alpha)
    s = torch.sigmoid(alpha)[:, None, None]
    assert torch.allclose(out[:, :, 1:], s * k[:, :, 1:] + (1 - s) * k[:, :, :-1])
    assert torch.allclose(out[:, :, 0], k[:, :, 0])
    assert torch.allclose(tm.smear_keys(k, torch.full((3,), 30.0)), k)  # sigma -> 1: plain keys

    cfg = tm.AttnOnlyConfig(vocab=16, n_ctx=12, d_model=16, n_heads=2, d_head=8, n_layers=2, init_std=0.3,
                            smeared_keys=True)
    plain = tm.AttnOnlyTransformer(dataclasses.replace(cfg, smeared_keys=False), torch.Generator().manual_seed(3))
    model = tm.AttnOnlyTransformer(cfg, torch.Generator().manual_seed(3))
    # the smearing weight is added last and without a random draw: the other weights are the plain model's
    assert all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in plain.named_parameters())
    assert torch.equal(model.smear, torch.zeros(2, 2))
    other = tm.AttnOnlyTransformer(cfg, torch.Generator().manual_seed(5))
    with torch.no_grad():
        model.smear.copy_(torch.tensor([[1.5, -2.0], [0.3, 4.0]]))
        other.smear.copy_(torch.tensor([[-1.0, 0.5], [2.0, -3.0]]))
    tokens = torch.randint(0, 16, (2, 3, 12), generator=torch.Generator().manual_seed(4))
    ref, _ = model(tokens[0], return_cache=True)
    assert torch.allclose(model(tokens[0]), ref, atol=1e-5)
    assert not torch.allclose(ref, plain(tokens[0]), atol=1e-2)
    with torch.no_grad():  # each copy its own weights, smearing and tokens
        both = model.chains_forward(tm.stack_params([model, other]), tokens)
    assert torch.allclose(both[0], ref, atol=1e-5) and torch.allclose(both[1], other(tokens[1]), atol=1e-5)


def test_sample_many_is_each_source_sampled_alone():
    spec = tm.MarkovRepeatSpec(vocab=16, n_ctx=24, min_len=3, max_len=10)
    sources = [tm.MarkovRepeatData(spec, seed=0), tm.MarkovRepeatData(dataclasses.replace(spec, p_repeat=0.0), seed=0),
               tm.MarkovRepeatData(spec, seed=5)]
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    toks, lens = tm.sample_many(sources, 6, gens)
    assert toks.shape == (3, 6, 24) and lens.shape == (3, 6)
    for c, (source, seed) in enumerate(zip(sources, (1, 2, 3))):
        alone, alone_lens = source.sample(6, torch.Generator().manual_seed(seed))
        assert torch.equal(toks[c], alone) and torch.equal(lens[c], alone_lens)
    assert (lens[1] == 0).all()  # the chain alone: no repeats
    with pytest.raises(ValueError, match="one vocabulary"):
        tm.sample_many([sources[0], tm.MarkovRepeatData(dataclasses.replace(spec, n_ctx=20), seed=0)], 2, gens[:2])


@pytest.mark.parametrize("smeared", [False, True])
def test_train_stacked_is_each_model_trained_alone_bit_for_bit(smeared):
    """Three models of one shape (two learning rates, three seeds, three data sources) trained as one
    program end where each ends when trained alone by :func:`train` with the same seeds: the same
    losses and weights to the last bit, at one thread (batched products add in the order of single
    ones here; the fused AdamW kernel meets each copy's tensors as it meets a single model's)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = tm.MarkovRepeatSpec(vocab=24, n_ctx=24, min_len=4, max_len=10)
        cfg = tm.AttnOnlyConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, vocab=24, n_ctx=24, smeared_keys=smeared)
        seeds, lrs = [0, 1, 2], [3e-3, 1e-2, 3e-3]
        sources = [tm.MarkovRepeatData(spec, seed=s) for s in seeds]
        alone = []
        for s, lr, data in zip(seeds, lrs, sources):
            model = tm.AttnOnlyTransformer(cfg, generator=torch.Generator().manual_seed(s))
            losses = tm.train(model, lambda g, d=data: d.sample(8, g)[0], steps=60, lr=lr, seed=100 + s)
            alone.append((np.asarray(losses, dtype=np.float32), model))
        models = [tm.AttnOnlyTransformer(cfg, generator=torch.Generator().manual_seed(s)) for s in seeds]
        seen = []
        final = {}

        def on_eval(step, stacked):
            seen.append(step)
            final.update({k: v.detach().clone() for k, v in stacked.items()})

        losses = tm.train_stacked(models, lambda gs: tm.sample_many(sources, 8, gs)[0], steps=60, lrs=lrs,
                                  seeds=[100 + s for s in seeds], eval_every=20, on_eval=on_eval)
        assert seen == [0, 20, 40, 60] and losses.shape == (60, 3)
        for c, (ref_losses, ref) in enumerate(alone):
            assert np.array_equal(losses[:, c], ref_losses)
            for k, v in ref.named_parameters():
                assert torch.equal(final[k][c], v.detach()), k
            copy = tm.copy_of(final, c, tm.AttnOnlyTransformer(cfg))
            assert all(torch.equal(v, dict(ref.named_parameters())[k]) for k, v in copy.named_parameters())
        assert not np.array_equal(losses[:, 0], losses[:, 2])  # different seeds, different runs
    finally:
        torch.set_num_threads(threads)
