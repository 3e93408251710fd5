"""Sampling against the distribution it should draw from: many draws of one row of logits, their
empirical frequencies compared with a float64 top-k / top-p filter written independently here."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megamoe.model.transformer import sample_next

N_DRAWS = 40_000


def filtered_distribution(logits: np.ndarray, temperature: float, top_k, top_p) -> np.ndarray:
    """HF/Fairseq semantics: scale by 1/T, keep the k largest, then the smallest prefix of the
    sorted distribution whose mass reaches top_p (always at least one token), renormalise."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(len(z), dtype=bool)
    keep[order[:top_k or len(z)]] = True
    p = np.exp(z - z.max()) * keep
    p /= p.sum()
    if top_p is not None and top_p < 1:
        mass = 0.0
        nucleus = np.zeros(len(z), dtype=bool)
        for i in order:
            if not keep[i]:
                break
            nucleus[i] = True
            mass += p[i]
            if mass >= top_p:
                break
        p = p * nucleus
        p /= p.sum()
    return p


def empirical(logits: torch.Tensor, temperature, top_k, top_p) -> np.ndarray:
    rows = logits.expand(N_DRAWS, -1)
    ids = sample_next(rows, temperature, top_k, top_p, generator=torch.Generator().manual_seed(0))
    return np.bincount(ids.numpy(), minlength=logits.shape[-1]) / N_DRAWS


LOGITS = torch.tensor([[2.0, 1.5, 1.2, 1.0, 0.6, 0.3, 0.0, -0.4, -1.0, -2.0]])


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, None, None), (0.7, None, None), (1.0, 3, None), (1.3, 5, None),
    (1.0, None, 0.6), (1.0, None, 0.9), (0.8, 6, 0.75), (1.0, 1, None), (1.0, None, 0.05),
])
def test_sampled_frequencies_follow_the_filtered_distribution(temperature, top_k, top_p):
    expected = filtered_distribution(LOGITS[0].numpy(), temperature, top_k, top_p)
    seen = empirical(LOGITS, temperature, top_k, top_p)
    assert np.all(seen[expected == 0] == 0), (seen, expected)      # filtered tokens never appear
    # 5 standard errors of a binomial frequency: a wrong filter moves whole tokens' mass
    tol = 5 * np.sqrt(expected * (1 - expected) / N_DRAWS) + 1e-9
    assert np.all(np.abs(seen - expected) <= tol), (seen, expected)


def test_filters_change_the_distribution():
    """The cases above are informative: top-k and top-p each remove mass the plain draw has."""
    plain = filtered_distribution(LOGITS[0].numpy(), 1.0, None, None)
    assert (plain > 0).all()
    assert (filtered_distribution(LOGITS[0].numpy(), 1.0, 3, None) > 0).sum() == 3
    assert (filtered_distribution(LOGITS[0].numpy(), 1.0, None, 0.6) > 0).sum() < 10


def test_greedy_at_temperature_zero_ignores_the_generator():
    ids = sample_next(LOGITS.expand(4, -1), 0.0, 3, 0.5)
    assert ids.tolist() == [0, 0, 0, 0]
