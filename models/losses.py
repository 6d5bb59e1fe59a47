"""Losses for next-item and retrieval training.

Shapes: N scored positions, D dim, I items, S sampled negatives, B batch. Targets are item ids
1..I (0 = padding, ignored).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def full_softmax(hidden: torch.Tensor, catalogue: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over every item. hidden (N, D), catalogue (I, D), targets (N,) in 1..I."""
    return F.cross_entropy(hidden @ catalogue.T, targets - 1)


def sampled_softmax(
    hidden: torch.Tensor,
    catalogue: torch.Tensor,
    targets: torch.Tensor,
    *,
    num_negatives: int,
    log_q: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Softmax over the target and ``num_negatives`` items drawn from q, with log-Q correction.

    Subtracting log q(item) from every logit makes the sampled softmax an unbiased estimate of
    the full one for any proposal q (Bengio & Senécal; Yi et al. 2019). Negatives that happen to
    be the target are masked out.

    Args:
        hidden: (N, D) query vectors.
        catalogue: (I, D) item vectors (item id j at row j - 1).
        targets: (N,) item ids in 1..I.
        num_negatives: S, shared by all N positions (one draw per batch, as in practice).
        log_q: (I,) log proposal probability of each item (e.g. from popularity).
        generator: random source, for determinism.
    """
    negatives = torch.multinomial(log_q.exp(), num_negatives, replacement=True, generator=generator)
    positive_logits = (hidden * catalogue[targets - 1]).sum(-1, keepdim=True) - log_q[targets - 1].unsqueeze(-1)
    negative_logits = hidden @ catalogue[negatives].T - log_q[negatives]
    accidental = negatives.unsqueeze(0) == (targets - 1).unsqueeze(-1)
    negative_logits = negative_logits.masked_fill(accidental, float("-inf"))
    logits = torch.cat([positive_logits, negative_logits], dim=-1)
    return F.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.long, device=logits.device))


def in_batch_softmax(
    users: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, log_q: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Each user's positive against the other positives of the batch, log-Q corrected.

    users (B, D), items (B, D) the positives' vectors, targets (B,) their ids (duplicates of a
    row's own target are not negatives), log_q (I,) item sampling log-probabilities.
    """
    logits = users @ items.T / temperature - log_q[targets - 1].unsqueeze(0)
    same = targets.unsqueeze(0) == targets.unsqueeze(1)
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(targets), device=logits.device))
