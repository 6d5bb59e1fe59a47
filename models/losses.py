"""Losses for next-item and retrieval training.

Shapes: N scored positions, D dim, I items, S sampled negatives, B batch. Targets are item ids
1..I (0 = padding, ignored).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# Rows of logits per block: small enough that a (256, I) block is a few MB for catalogues of ~10^4
# items, large enough that each block's matmuls still run at full speed.
FULL_SOFTMAX_BLOCK_ROWS = 256


class _BlockwiseSoftmaxCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ catalogue.T`` without materialising the (N, I) logits.

    Each block of rows computes its logits, log-sum-exp and gradient (softmax minus one-hot) in
    one pass, so at most one (block, I) array exists at a time instead of the several (N, I)
    ones autograd would keep. The plain version is memory-bound on CPU; the smaller working set
    is what makes this one faster.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, catalogue: torch.Tensor, targets: torch.Tensor,
                block_rows: int) -> torch.Tensor:
        rows = hidden.shape[0]
        exact = torch.promote_types(hidden.dtype, torch.float32)  # half-precision inputs sum in float32
        want_hidden, want_catalogue = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_catalogue = torch.zeros_like(catalogue, dtype=exact) if want_catalogue else None
        total = torch.zeros((), dtype=exact, device=hidden.device)
        for start in range(0, rows, block_rows):
            block = hidden[start:start + block_rows]
            index = targets[start:start + block_rows, None]
            logits = (block @ catalogue.T).to(exact)
            normaliser = torch.logsumexp(logits, dim=-1, keepdim=True)
            total += (normaliser - logits.gather(1, index)).sum()
            if want_hidden or want_catalogue:
                probabilities = logits.sub_(normaliser).exp_()
                probabilities.scatter_add_(1, index, torch.full_like(index, -1, dtype=probabilities.dtype))
                gradient = probabilities.to(hidden.dtype)
                if grad_hidden is not None:
                    grad_hidden[start:start + block_rows] = gradient @ catalogue
                if grad_catalogue is not None:
                    grad_catalogue.addmm_(gradient.T.to(exact), block.to(exact))
        ctx.rows = max(rows, 1)
        ctx.save_for_backward(grad_hidden, None if grad_catalogue is None else grad_catalogue.to(catalogue.dtype))
        return total / ctx.rows

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        grad_hidden, grad_catalogue = ctx.saved_tensors
        scale = grad_output / ctx.rows
        return (None if grad_hidden is None else grad_hidden * scale,
                None if grad_catalogue is None else grad_catalogue * scale, None, None)


def full_softmax(hidden: torch.Tensor, catalogue: torch.Tensor, targets: torch.Tensor,
                 *, block_rows: int = FULL_SOFTMAX_BLOCK_ROWS) -> torch.Tensor:
    """Cross-entropy over every item. hidden (N, D), catalogue (I, D), targets (N,) in 1..I.

    Equal to ``F.cross_entropy(hidden @ catalogue.T, targets - 1)`` (value and gradients), computed
    ``block_rows`` rows at a time; not twice differentiable.
    """
    if targets.numel() and not (int(targets.min()) >= 1 and int(targets.max()) <= catalogue.shape[0]):
        raise ValueError(f"targets must be item ids in 1..{catalogue.shape[0]}")
    return _BlockwiseSoftmaxCrossEntropy.apply(hidden, catalogue, targets - 1, block_rows)


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
