"""SASRec: self-attentive sequential recommendation (Kang & McAuley, 2018), pre-LN variant.

Shapes: B batch, L sequence length, D dim, I catalogue items. Item ids are 1..I, 0 = padding;
sequences are left-padded so the newest item is at position L-1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.layers import PAD, CausalEncoder, ItemEmbedding, gap_buckets


@dataclass(frozen=True)
class SASRecConfig:
    num_items: int
    max_length: int = 50
    dim: int = 64
    heads: int = 2
    blocks: int = 2
    ffn_dim: int = 128
    dropout: float = 0.5
    use_behaviors: bool = False
    num_behaviors: int = 4
    use_gaps: bool = False
    gap_buckets: int = 24
    # Share of each block's token mixing done by the causal low-pass filter instead of attention
    # (0 = plain SASRec, the default here so models saved before the filter existed still load).
    lowpass_mix: float = 0.0

    def __post_init__(self) -> None:
        for name in ("num_items", "max_length", "dim", "heads", "blocks", "ffn_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SASRec {name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"SASRec dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.lowpass_mix <= 1:
            raise ValueError(f"SASRec lowpass_mix must be in [0, 1], got {self.lowpass_mix}")


class SASRec(nn.Module):
    """Causal self-attention over the item sequence; item embeddings tied to the output layer.

    Optional inputs add behaviour-type and time-gap embeddings to each position. With
    ``lowpass_mix`` > 0 each block mixes tokens with a causal low-pass filter beside attention
    (see ``CausalLowPass``).

    Example::

        model = SASRec(SASRecConfig(num_items=1000, max_length=20))
        hidden = model(torch.randint(0, 1001, (8, 20)))      # (8, 20, 64)
        logits = model.score(hidden[:, -1])                  # (8, 1000): items 1..1000
    """

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        self.items = ItemEmbedding(config.num_items, config.dim)
        self.positions = nn.Embedding(config.max_length, config.dim)
        self.behaviors = (
            nn.Embedding(config.num_behaviors + 1, config.dim, padding_idx=PAD)
            if config.use_behaviors
            else None
        )
        self.gaps = (
            nn.Embedding(config.gap_buckets + 1, config.dim, padding_idx=PAD) if config.use_gaps else None
        )
        self.input_dropout = nn.Dropout(config.dropout)
        self.encoder = CausalEncoder(
            config.dim, config.heads, config.blocks, config.ffn_dim, config.dropout, config.lowpass_mix
        )

    def forward(
        self,
        items: torch.Tensor,
        behaviors: torch.Tensor | None = None,
        gaps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """items (B, L) ids, behaviors (B, L) codes, gaps (B, L) seconds -> hidden (B, L, D)."""
        if items.shape[1] > self.config.max_length:
            raise ValueError(f"sequence length {items.shape[1]} > max_length {self.config.max_length}")
        padding = items == PAD
        length = items.shape[1]
        positions = torch.arange(self.config.max_length - length, self.config.max_length, device=items.device)
        x = self.items(items) * (self.config.dim**0.5) + self.positions(positions)
        if self.behaviors is not None and behaviors is not None:
            x = x + self.behaviors(behaviors.masked_fill(padding, PAD))
        if self.gaps is not None and gaps is not None:
            x = x + self.gaps(gap_buckets(gaps, self.config.gap_buckets).masked_fill(padding, PAD))
        return self.encoder(self.input_dropout(x), padding)

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (…, D) -> logits (…, I) over all items 1..I (column j is item j+1)."""
        return hidden @ self.items.catalogue().T

    def last_hidden(
        self,
        items: torch.Tensor,
        behaviors: torch.Tensor | None = None,
        gaps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The representation after the newest item: (B, L) -> (B, D)."""
        return self(items, behaviors, gaps)[:, -1]
