"""Two-tower retrieval model: a user tower over the recent item sequence and an item tower over
item id and category, trained with in-batch negatives (see ``models.losses``).

Shapes: B batch, L sequence length, D dim, I items, C categories. Item ids 1..I (0 = padding);
category ids 1..C (0 = unknown).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import PAD, ItemEmbedding, masked_mean


@dataclass(frozen=True)
class TwoTowerConfig:
    num_items: int
    num_categories: int = 0
    dim: int = 64
    hidden: int = 128
    dropout: float = 0.1
    temperature: float = 0.05

    def __post_init__(self) -> None:
        if self.num_items <= 0 or self.dim <= 0 or self.hidden <= 0:
            raise ValueError("TwoTower num_items, dim and hidden must be positive")
        if self.temperature <= 0:
            raise ValueError(f"TwoTower temperature must be positive, got {self.temperature}")


def _mlp(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))


class TwoTower(nn.Module):
    """User and item towers producing L2-normalised vectors whose dot product is the score.

    Example::

        model = TwoTower(TwoTowerConfig(num_items=500, num_categories=20))
        users = model.user_vectors(torch.randint(0, 501, (4, 10)))          # (4, 64)
        items = model.item_vectors(torch.arange(1, 501), torch.zeros(500, dtype=torch.long))
        scores = users @ items.T / model.config.temperature                 # (4, 500)
    """

    def __init__(self, config: TwoTowerConfig) -> None:
        super().__init__()
        self.config = config
        self.history_items = ItemEmbedding(config.num_items, config.dim)
        self.user_mlp = _mlp(config.dim, config.hidden, config.dropout)
        self.item_ids = ItemEmbedding(config.num_items, config.dim)
        self.categories = nn.Embedding(config.num_categories + 1, config.dim, padding_idx=PAD)
        self.item_mlp = _mlp(config.dim, config.hidden, config.dropout)
        self.item_categories: torch.Tensor
        self.register_buffer("item_categories", torch.zeros(config.num_items + 1, dtype=torch.long))

    def set_item_categories(self, categories: torch.Tensor) -> None:
        """(I + 1,) category id (0 = unknown) of every item id, used when scoring all items."""
        if categories.shape != self.item_categories.shape:
            raise ValueError(f"expected {tuple(self.item_categories.shape)} categories, got {tuple(categories.shape)}")
        self.item_categories.copy_(categories)

    def user_vectors(self, history: torch.Tensor) -> torch.Tensor:
        """history (B, L) item ids -> (B, D) unit vectors."""
        pooled = masked_mean(self.history_items(history), history == PAD)
        return F.normalize(pooled + self.user_mlp(pooled), dim=-1)

    def item_vectors(self, items: torch.Tensor, categories: torch.Tensor | None = None) -> torch.Tensor:
        """items (N,) ids (and their categories) -> (N, D) unit vectors."""
        if categories is None:
            categories = self.item_categories[items]
        x = self.item_ids(items) + self.categories(categories)
        return F.normalize(x + self.item_mlp(x), dim=-1)

    def catalogue(self) -> torch.Tensor:
        """(I, D) vectors of every item 1..I: what retrieval indexes and serving exports."""
        ids = torch.arange(1, self.config.num_items + 1, device=self.item_categories.device)
        return self.item_vectors(ids)

    def score(self, history: torch.Tensor) -> torch.Tensor:
        """history (B, L) -> logits (B, I) over items 1..I."""
        return self.user_vectors(history) @ self.catalogue().T / self.config.temperature
