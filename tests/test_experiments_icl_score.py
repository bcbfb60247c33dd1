import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from icl import experiments
from icl.experiments import icl_score
from icl.models import byte_tokenizer


class PositionalBridge:
    """Gives the true next token probability p(t) that rises with position t; loss = -log p(t)."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        b, n = ids.shape
        pos = torch.arange(n, dtype=torch.float32)
        target_logit = torch.log1p(pos)  # p(true) grows with position
        logits = torch.zeros(b, n, self.vocab)
        logits[:, :-1].scatter_(-1, ids[:, 1:, None], target_logit[:-1, None].expand(b, n - 1, 1))
        return logits


def test_documents_ship_with_the_package():
    docs = icl_score.documents()
    assert len(docs) >= 10 and all(len(text) > 5000 for _, text in docs)
    assert docs[0][0] == "specialnames"


def test_score_on_a_model_with_known_losses():
    tok = byte_tokenizer()
    vocab = len(tok)
    params = experiments.make_params(icl_score, {"window": "64", "n_windows": "6", "early": "10",
                                                 "late": "50", "halfwidth": "2", "n_boot": "50"})
    fake = SimpleNamespace(bridge=PositionalBridge(vocab), tokenizer=tok, device="cpu",
                           spec=SimpleNamespace(name="fake"))
    arrays, data = icl_score.compute(params, fake)

    def loss(t):  # token index t (1-based) is predicted at 0-based position t - 2
        z = math.log1p(t - 2)
        return -(z - math.log(math.exp(z) + vocab - 1))

    expected = np.mean([loss(t) for t in range(48, 53)]) - np.mean([loss(t) for t in range(8, 13)])
    assert data["score"][0] == pytest.approx(expected, abs=1e-4)
    assert data["score"][0] < 0 and data["n_windows"] == 6
    assert arrays["loss.mean"].shape == (63,)


def test_bad_positions_are_rejected():
    with pytest.raises(Exception, match="halfwidth"):
        experiments.make_params(icl_score, {"late": "600"})
