"""gpt: a decoder-only transformer (GPT-2 style) over int64 token blocks (B, T) -> (B, T, V).

Token and learned position embeddings, `model.depth` pre-LayerNorm blocks (causal
self-attention through scaled_dot_product_attention, then a 4x-wide GELU MLP, each added to
the residual stream), a final LayerNorm and a head tied to the token embedding. GPT-2's
initialisation: weights N(0, 0.02), the projections into the residual stream scaled by
1/sqrt(2 depth) so its variance does not grow with depth.

`model.dropout` (raymb.models.dropout: each row's mask, the same under any W and k) drops the
embeddings' sum, the attention weights and the two residual branches. With attention dropout
in training the attention is computed explicitly (scaled_dot_product_attention draws its own
mask); in eval, or at rate 0, it is scaled_dot_product_attention's fused kernel.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from raymb.config import GptModel
from raymb.core import rng
from raymb.errors import ConfigError
from raymb.models.dropout import RowDropout


def build(section: GptModel, shape: tuple[int, ...], vocab: int) -> nn.Module:
    """The gpt for token blocks of shape (T,); positions: model.block_size, or T if unset."""
    if len(shape) != 1:
        raise ConfigError(
            f"model.name 'gpt' needs rows of T token ids, got rows of shape {list(shape)}: "
            "use a tokens column (data.task = 'lm')"
        )
    (tokens,) = shape
    block = section.block_size if section.block_size is not None else tokens
    if block < tokens:
        raise ConfigError(
            f"model.block_size={block} is shorter than the data's blocks of {tokens} tokens: "
            f"raise it to at least {tokens} or leave it unset"
        )
    return GPT(
        vocab=vocab,
        block_size=block,
        depth=section.depth,
        width=section.width,
        heads=section.heads,
        dropout=section.dropout,
    )


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float, stream: int) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.attn_drop = RowDropout(dropout, stream)
        self.drop = RowDropout(dropout, stream + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, heads, T, C / heads)
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if self.training and self.dropout > 0 and rng.current() is not None:
            # The row-keyed mask on the weights, which the fused kernel cannot take.
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
            future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu_(1)
            weights = self.attn_drop(scores.masked_fill(future, float("-inf")).softmax(dim=-1))
            y = weights @ v
        else:  # eval, rate 0, or outside raymb's loop (the kernel's own dropout)
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float, stream: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout, stream)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)
        self.drop = RowDropout(dropout, stream + 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.drop(self.proj(F.gelu(self.fc(self.ln2(x)))))


class GPT(nn.Module):
    def __init__(
        self, *, vocab: int, block_size: int, depth: int, width: int, heads: int, dropout: float
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(block_size, width)
        self.drop = RowDropout(dropout, stream=1)
        # Streams: 1 the embeddings; block i: 2 + 3i the attention weights, then its two
        # residual branches.
        self.blocks = nn.ModuleList(Block(width, heads, dropout, 2 + 3 * i) for i in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tokens.weight  # tied: one matrix, one gradient
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # attn.proj and the MLP's proj: into the residual
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * depth))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of the next token after each prefix of idx (B, T), T <= block_size."""
        T = idx.shape[1]
        x = self.drop(self.tokens(idx) + self.positions.weight[:T])
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
