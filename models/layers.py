"""Named building blocks shared by the models: item embedding, causal encoder, pooling.

Shapes use fixed letters: B batch, L sequence length, D embedding dim, I catalogue items.
Item ids inside models are 1..I; 0 is padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PAD = 0


class ItemEmbedding(nn.Module):
    """Embeddings of items 1..I plus a zero padding row 0; also the output layer when tied.

    Example::

        emb = ItemEmbedding(num_items=100, dim=32)
        vectors = emb(torch.tensor([[0, 5, 7]]))   # (1, 3, 32); row 0 stays zero
    """

    def __init__(self, num_items: int, dim: int) -> None:
        super().__init__()
        if num_items <= 0 or dim <= 0:
            raise ValueError(f"num_items and dim must be positive, got {num_items}, {dim}")
        self.num_items = num_items
        self.weight = nn.Parameter(torch.empty(num_items + 1, dim))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(dim))
        with torch.no_grad():
            self.weight[PAD].zero_()

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """(…) item ids -> (…, D)."""
        return F.embedding(items, self.weight, padding_idx=PAD)

    def catalogue(self) -> torch.Tensor:
        """(I, D) embeddings of every real item (id 1..I), for scoring against all items."""
        return self.weight[1:]


class CausalLowPass(nn.Module):
    """A causal low-pass filter over the sequence with a learned gain on what it removes.

    BSARec (Shin et al., AAAI 2024) mixes self-attention with a Fourier filter that keeps a
    sequence's low frequencies and rescales the rest, an inductive bias that helps on sparse
    e-commerce data. Its filter sees the whole sequence, which would leak each position's target
    under SASRec's every-position objective; this one only looks back: the low part is a
    per-channel exponentially decayed mean of the positions up to t (decay learned, padding
    excluded), and ``low + beta * (x - low)`` rescales the high part per channel.

    Example::

        lowpass = CausalLowPass(dim=32)
        y = lowpass(torch.randn(4, 10, 32), padding=torch.zeros(4, 10, dtype=torch.bool))  # (4, 10, 32)
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        # Decays start spread over sigmoid(-1..3) = 0.27..0.95: short to long memories per channel.
        self.decay_logit = nn.Parameter(torch.linspace(-1.0, 3.0, dim))
        self.beta = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), padding (B, L) True at padded positions -> (B, L, D)."""
        steps = torch.arange(x.shape[1], device=x.device)
        lag = steps[:, None] - steps[None, :]                                     # (L, L): t - s
        # weight[d, t, s] = decay_d ** (t - s) for s <= t, else 0
        weight = torch.exp(lag.clamp(min=0).to(x.dtype) * F.logsigmoid(self.decay_logit)[:, None, None])
        weight = weight * (lag >= 0).to(x.dtype)
        keep = (~padding).to(x.dtype)
        total = torch.einsum("dts,bsd->btd", weight, x * keep.unsqueeze(-1))
        norm = torch.einsum("dts,bs->btd", weight, keep).clamp(min=1e-6)
        low = total / norm
        return low + self.beta * (x - low)


class CausalBlock(nn.Module):
    """Pre-LN transformer block with causal self-attention (SASRec's block, pre-norm variant).

    With ``lowpass_mix`` = a in (0, 1] the token mixing is a * low-pass filter + (1 - a) *
    attention, BSARec's blend with a causal filter (``CausalLowPass``).
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, lowpass_mix: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.lowpass_mix = lowpass_mix
        self.lowpass = CausalLowPass(dim) if lowpass_mix > 0 else None
        self.heads = heads
        self.attn_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))
        # Dropout on the two residual branches only: on CPU every dropout mask costs a random
        # draw per element, and attention-weight dropout forces the unfused attention path.
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """x (B, L, D); allowed (B, 1, L, L) True where a query may attend to a key;
        padding (B, L) True at padded positions."""
        b, length, dim = x.shape
        normed = self.attn_norm(x)
        q, k, v = self.qkv(normed).chunk(3, dim=-1)
        shape = (b, length, self.heads, dim // self.heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        mixed = self.out(attended.transpose(1, 2).reshape(b, length, dim))
        if self.lowpass is not None:
            mixed = self.lowpass_mix * self.lowpass(normed, padding) + (1 - self.lowpass_mix) * mixed
        x = x + self.dropout(mixed)
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class CausalEncoder(nn.Module):
    """A stack of ``CausalBlock`` with a final LayerNorm; position t sees positions <= t only.

    Example::

        encoder = CausalEncoder(dim=32, heads=2, blocks=2, ffn_dim=64, dropout=0.1)
        h = encoder(torch.randn(4, 10, 32), padding=torch.zeros(4, 10, dtype=torch.bool))
    """

    def __init__(self, dim: int, heads: int, blocks: int, ffn_dim: int, dropout: float,
                 lowpass_mix: float = 0.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(CausalBlock(dim, heads, ffn_dim, dropout, lowpass_mix) for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), padding (B, L) True at padded positions -> (B, L, D)."""
        length = x.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        allowed = causal & ~padding[:, None, :]
        # A padded query would have no key at all (NaN); let every position see itself.
        allowed = (allowed | torch.eye(length, dtype=torch.bool, device=x.device)).unsqueeze(1)
        for block in self.blocks:
            x = block(x, allowed, padding)
        return self.norm(x) * (~padding).unsqueeze(-1)


def masked_mean(x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """Mean over L of x (B, L, D) ignoring padded positions (B, L) -> (B, D)."""
    keep = (~padding).unsqueeze(-1).to(x.dtype)
    return (x * keep).sum(1) / keep.sum(1).clamp(min=1.0)


def gap_buckets(gaps: torch.Tensor, buckets: int) -> torch.Tensor:
    """Seconds between events (B, L) -> log2 buckets 1..buckets (0 is padding)."""
    return (torch.log2(gaps.clamp(min=0).to(torch.float32) + 1.0).floor().long() + 1).clamp(max=buckets)
