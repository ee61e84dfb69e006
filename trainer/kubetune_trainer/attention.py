"""Attention that follows the examples of a packed row, not the row.

A packed row holds whole examples one after another, with position_ids restarting at 0 for each. sdpa
over the row with transformers' block-diagonal mask computes every score of the row and masks away all
but those inside an example (3% of them for a 2048-token row of 20 examples). `segments` attends
within each example only, so a row of 20 examples costs what 20 short sequences cost:

- on CUDA, one call of torch's variable-length flash attention (`torch.nn.attention.varlen`) over the
  whole row, given the examples' cumulative lengths;
- elsewhere (CPU), one causal sdpa call per example on views of the row.

The collator passes the examples' boundaries as `cu_seq_lens_q/k` and `max_length_q/k` (the keyword
arguments transformers' flash-attention path reads, so `flash_attention_2` works from the same batch);
without them they come from position_ids. Anything that is not a packed row (a padding mask, decoding
with a cache) goes to transformers' sdpa unchanged, so generation after training is untouched.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

NAME = "kubetune_segments"  # the attn_implementation name registered with transformers


def _boundaries(position_ids: torch.Tensor) -> list[int]:
    """Start offsets of the examples in one row (position_ids restart at 0), plus the row's end."""
    starts = torch.nonzero(position_ids == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return [*starts, position_ids.numel()]


def cu_seq_lens(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative example lengths of a [1, T] packed row, int32, as flash attention wants them."""
    return torch.tensor(_boundaries(position_ids[0]), dtype=torch.int32, device=position_ids.device)


def _varlen_available(query: torch.Tensor) -> bool:
    if not query.is_cuda:
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def segments_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query/key/value [batch, heads, T, head_dim] -> [batch, T, heads, head_dim]."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    cu = kwargs.get("cu_seq_lens_q")
    packed_row = attention_mask is None and query.shape[2] == key.shape[2] and query.shape[2] > 1
    if not packed_row or (cu is None and position_ids is None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if query.shape[0] == 1 and _varlen_available(query):
        from torch.nn.attention.varlen import varlen_attn

        if cu is None:
            cu = cu_seq_lens(position_ids)
        longest = int(kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max()))
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, head_dim]
        out = varlen_attn(q, k, v, cu.to(torch.int32), cu.to(torch.int32), longest, longest, scale=scaling,
                          window_size=(-1, 0))  # fmt: skip
        return out.unsqueeze(0), None
    rows = []
    for b in range(query.shape[0]):
        bounds = cu.tolist() if cu is not None and query.shape[0] == 1 else _boundaries(position_ids[b])
        lengths = [e - s for s, e in itertools.pairwise(bounds) if e > s]
        # split, not slicing: its backward is one cat of the examples' gradients, where every slice's
        # backward would write a zero-filled gradient of the whole row
        parts = [
            torch.nn.functional.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout if module.training else 0.0, is_causal=q.shape[2] > 1, scale=scaling
            )
            for q, k, v in zip(*(t[b : b + 1].split(lengths, dim=2) for t in (query, key, value)), strict=True)
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def segments_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """No mask for a packed row (the attention function knows the examples); sdpa's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    attention_mask = kwargs.get("attention_mask")
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> str:
    """Register `segments` with transformers (idempotent); returns the attn_implementation name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, segments_attention)
    AttentionMaskInterface.register(NAME, segments_mask)
    return NAME
