"""The llc_phase_change experiment: it reads phase_change's checkpoints (and a rerun's hook leaves training
unchanged, bit for bit against the committed phase_change run), the control-variate loss is exact, and a small run gives
finite, deterministic LLC estimates that are negative far from a minimum and positive once the loss
settles."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from icl import experiments, timing, toymodels as tm
from icl.config import REPO_ROOT, Config
from icl.experiments import llc_phase_change as lpc
from icl.experiments import phase_change as pc

# The committed cache, wherever the user's ICL_CACHE_DIR points.
COMMITTED = Config(cache_mode="readonly", cache_dir=REPO_ROOT / "cache")


def _train(p: pc.Params, hook=None):
    torch.set_num_threads(lpc.THREADS)
    data, heldout, _, probe = pc.eval_sets(p)
    return pc._train_one(p, 2, data, heldout, probe, False, on_checkpoint=hook)


def test_checkpoint_hook_does_not_change_training():
    p = dataclasses.replace(pc.Params(), steps=60, eval_every=20, d_model=32, n_heldout=32, n_probe=16)
    states = {}
    net_a, log_a, loss_a = _train(p, lambda s, m: states.__setitem__(s, copy.deepcopy(m.state_dict())))
    net_b, log_b, loss_b = _train(p)
    assert loss_a == loss_b
    assert np.array_equal(log_a["prefix_matching"], log_b["prefix_matching"])
    assert sorted(states) == [0, 20, 40, 60]
    for k, v in net_b.state_dict().items():  # the last checkpoint is the final model
        assert torch.equal(states[60][k], v), k
    assert not torch.equal(states[0]["W_U"], states[60]["W_U"])


@pytest.mark.slow
def test_rerun_reproduces_the_cached_phase_change_run_exactly():
    """The first 200 steps at phase_change's default settings equal the committed run's, bit for bit (no
    learning-rate schedule, so a shorter run is a prefix of the full one)."""
    entry, _ = experiments.run("phase_change", COMMITTED)  # committed: missing is a failure, not a skip
    p = dataclasses.replace(pc.Params(), steps=200)
    _, log, losses = _train(p, lambda s, m: None)
    assert np.array_equal(np.asarray(losses, np.float32), entry.arrays["L2.train_loss"][:200])
    assert np.array_equal(log["prefix_matching"].astype(np.float32), entry.arrays["L2.prefix_matching"][:3])
    assert np.array_equal(log["heldout_loss"].astype(np.float32), entry.arrays["L2.heldout_loss"][:3])


def test_control_variate_loss_is_exact():
    """``L_m(w) − L_m(w*)`` is zero at ``w*`` on every minibatch, and its average over a partition of
    the sample into equal minibatches is the full-sample ``L_n(w) − L_n(w*)``."""
    torch.manual_seed(0)
    p = pc.Params(d_model=16, n_heads=2)
    net = tm.AttnOnlyTransformer(pc.model_config(p, 2), generator=torch.Generator().manual_seed(0))
    data = tm.MarkovRepeatData(pc.data_spec(p), seed=0)
    tokens = data.sample(16, torch.Generator().manual_seed(1))[0]
    w_star, loss = lpc.sequence_loss_fn(net, tokens)
    idx = torch.arange(16)
    assert float(loss(w_star[None], idx[:4])[0]) == 0.0
    assert float(loss(w_star[None], None)[0]) == 0.0
    w = w_star + 0.05 * torch.randn(2, w_star.numel(), dtype=w_star.dtype, generator=torch.Generator().manual_seed(2))
    full = loss(w, None)  # [2]
    parts = torch.stack([loss(w, idx[i:i + 4]) for i in range(0, 16, 4)]).mean(0)
    assert torch.allclose(full, parts, rtol=1e-5, atol=1e-6)
    assert (full.abs() > 1e-3).all()  # the kick does change the loss, so the check has teeth
    # the loss is per sequence: (n_ctx - 1) times the mean next-token loss
    with torch.no_grad():
        per_token = tm.next_token_loss(net(tokens), tokens)
    assert per_token.item() == pytest.approx(np.log(p.vocab), abs=0.05)


@pytest.fixture(scope="module")
def trained():
    """A smaller model (d_model 32) trained 800 steps, with SGLD at steps 100, 400 and 800."""
    p = dataclasses.replace(lpc.Params(), steps=800, eval_every=100, d_model=32, checkpoints=(100, 400, 800),
                            n=512, batch_size=16, num_chains=3, num_steps=120, num_burnin=40)
    return p, lpc.compute(p)


@pytest.mark.slow
def test_estimates_are_finite_and_rise_as_training_settles(trained):
    """Far from a minimum (step 100, loss still falling fast) the chains keep training the model and
    the estimate is negative; as the fast descent ends it rises, and the most trained checkpoint has
    a positive estimate in every chain — the pattern of the full run's first 2,000 steps."""
    p, (arrays, data) = trained
    llc = arrays["llc_chains"]
    assert arrays["ckpt_step"].tolist() == [100, 400, 800]
    assert llc.shape == (3, p.num_chains) and arrays["trace"].shape == (3, p.num_chains, lpc.TRACE_POINTS)
    assert arrays["eval_step"].tolist() == list(range(0, 801, 100))
    assert data["all_finite"] and np.isfinite(llc).all()
    means = llc.mean(1)
    assert means[0] < 0 < means[2], means
    assert means[0] < means[1] < means[2], means
    assert (llc[2] > 0).all(), llc[2]
    # the checkpoints are trained models whose loss on the SGLD sample falls, and whose gradient shrinks
    assert arrays["ckpt_loss"][2] < arrays["ckpt_loss"][1] < arrays["ckpt_loss"][0] < np.log(64) - 0.5
    assert arrays["ckpt_grad_norm"][2] < arrays["ckpt_grad_norm"][0]
    # not phase_change's defaults: trained again, and nothing to compare with
    assert data["reproduction"] == {"compared": False, "reused": False}
    assert data["nbeta"] == pytest.approx(p.n / np.log(p.n))


@pytest.mark.slow
def test_same_seed_same_result(timing_keys):
    p = dataclasses.replace(lpc.Params(), steps=200, eval_every=100, d_model=32, checkpoints=(100, 200),
                            n=128, batch_size=16, num_chains=2, num_steps=40, num_burnin=10)
    with timing.collect() as times:
        (a1, d1), (a2, d2) = lpc.compute(p), lpc.compute(p)
    assert set(times) == {"train_seconds", "llc_seconds"} and timing_keys(d1) == []
    for k in a1:
        assert np.array_equal(a1[k], a2[k]), k
    assert d1 == d2  # timings are provenance, recorded through icl.timing, not results


def test_cached_result_uses_the_phase_change_checkpoints():
    """The committed default run read its checkpoints from the committed phase_change entry (no second
    training); its estimates are finite, and after the transition window they exceed every value before it."""
    entry, _ = experiments.run("llc_phase_change", COMMITTED)
    pc_entry, _ = experiments.run("phase_change", COMMITTED)
    rep = entry.data["reproduction"]
    assert rep["reused"] and rep["phase_change_key"] == pc_entry.key
    assert entry.arrays["ckpt_step"].tolist() == [int(s) for s in lpc.Params().checkpoints]
    assert np.array_equal(entry.arrays["train_loss"], pc_entry.arrays["L2.train_loss"])
    steps, llc = entry.arrays["ckpt_step"], entry.arrays["llc_chains"].mean(1)
    assert np.isfinite(entry.arrays["llc_chains"]).all()
    tr = entry.data["transition_induction"]
    assert tr == pc_entry.data["L2"]["transition_induction"]
    assert llc[steps > tr["done"]].min() > llc[steps <= tr["onset"]].max()


def test_phase_change_keeps_checkpoints_and_llc_reads_them():
    """phase_change stores the 2-layer weights at its checkpoints (the last is the final model), and
    llc_phase_change takes exactly those, only when the training parameters are phase_change's."""
    p = dataclasses.replace(pc.Params(), steps=60, eval_every=20, d_model=32, n_heldout=32, n_probe=16,
                            checkpoints=(20, 60))
    arrays, _ = pc.compute(p)
    assert arrays["L2.ckpt_step"].tolist() == [20, 60]
    final = {k[len("L2.state."):]: v for k, v in arrays.items() if k.startswith("L2.state.")}
    for name, value in final.items():
        assert np.array_equal(arrays[f"L2.ckpt.60.{name}"], value), name
    assert not np.array_equal(arrays["L2.ckpt.20.W_U"], final["W_U"])

    class Entry:  # what compute() receives as upstream["phase_change"]
        def __init__(self, arrays):
            self.arrays, self.key = arrays, "k" * 64

    up = {"phase_change": Entry(arrays)}
    assert lpc._stored(p, [20, 60], up) is None  # not phase_change's defaults: its entry is not this run
    default = pc.Params()
    fake = {"L2.ckpt_step": np.array([20, 60]), **{f"L2.ckpt.{s}.{k}": arrays[f"L2.ckpt.{s}.{k}"]
                                                   for s in (20, 60) for k in final}}
    got = lpc._stored(default, [60], {"phase_change": Entry(fake)})
    assert list(got) == [60] and torch.equal(got[60]["W_U"], torch.from_numpy(final["W_U"]))
    assert lpc._stored(default, [40], {"phase_change": Entry(fake)}) is None  # a step it did not keep
    assert lpc._stored(default, [60], None) is None


def test_params_are_checked():
    lpc.Params().validate()
    assert lpc.pc_params(lpc.Params()) == pc.Params()  # same training as the cached phase_change run
    for bad in ({"checkpoints": (150,)}, {"checkpoints": (9000,)}, {"checkpoints": (200, 100)},
                {"num_burnin": 400}, {"batch_size": 2048}):
        with pytest.raises(ValueError):
            dataclasses.replace(lpc.Params(), **bad).validate()
    assert lpc.content_digest(lpc.Params()) != lpc.content_digest(dataclasses.replace(lpc.Params(), n=512))
