"""Matrix factorisation with user and item biases, for implicit feedback.

Shapes: B batch, D dim, U users, I items. Users are 0..U-1 (dense user indices); items 1..I
(0 = padding, as in the other models). A user the model has not seen scores by item bias only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MFConfig:
    num_users: int
    num_items: int
    dim: int = 64

    def __post_init__(self) -> None:
        if self.num_users <= 0 or self.num_items <= 0 or self.dim <= 0:
            raise ValueError("MF num_users, num_items and dim must be positive")


class MatrixFactorization(nn.Module):
    """score(u, i) = p_u · q_i + b_u + b_i, the classic biased MF.

    Under a softmax over items ``b_u`` cancels (its gradient is zero and it never changes a
    user's ranking); it is kept in the score so the model is the classic one, is usable with
    pointwise losses, and every parameter takes part in the graph (DDP requires that).

    Example::

        model = MatrixFactorization(MFConfig(num_users=100, num_items=50, dim=8))
        logits = model.score(torch.tensor([0, 3]))     # (2, 50): items 1..50
    """

    def __init__(self, config: MFConfig) -> None:
        super().__init__()
        self.config = config
        self.users = nn.Embedding(config.num_users, config.dim)
        self.items = nn.Embedding(config.num_items + 1, config.dim, padding_idx=0)
        self.user_bias = nn.Embedding(config.num_users, 1)
        self.item_bias = nn.Embedding(config.num_items + 1, 1, padding_idx=0)
        for table in (self.users, self.items):
            nn.init.normal_(table.weight, std=0.05)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)

    def user_biases(self, users: torch.Tensor) -> torch.Tensor:
        """users (B,) -> (B, 1); zero for unknown users."""
        known = (users >= 0) & (users < self.config.num_users)
        return self.user_bias(users.clamp(0, self.config.num_users - 1)) * known.unsqueeze(-1)

    def user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        """users (B,) -> (B, D); unknown users (index >= U or < 0) get the zero vector."""
        known = (users >= 0) & (users < self.config.num_users)
        vectors = self.users(users.clamp(0, self.config.num_users - 1))
        return vectors * known.unsqueeze(-1)

    def score(self, users: torch.Tensor) -> torch.Tensor:
        """users (B,) -> logits (B, I) over items 1..I."""
        item_bias = self.item_bias.weight[1:, 0]
        return self.user_vectors(users) @ self.items.weight[1:].T + item_bias + self.user_biases(users)

    def pair_scores(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """users (B,), items (B, N) -> (B, N) scores of the given items."""
        return ((self.user_vectors(users).unsqueeze(1) * self.items(items)).sum(-1) + self.item_bias(items)[..., 0]
                + self.user_biases(users))
