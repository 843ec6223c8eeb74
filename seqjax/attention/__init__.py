"""Softmax attention and its variants: the Transformer++ attention layer (``attention``), TCNCA
(``tcnca``), Combiner-Axial (``combiner``) and n-gram heads (``ngram``)."""

from seqjax.attention.attention import (
    Attention,
    KVCache,
    SlidingWindowAttention,
    attention,
    attention_reference,
    make_mask,
    positions_from_segment_ids,
    rope,
)

__all__ = ["Attention", "KVCache", "SlidingWindowAttention", "attention", "attention_reference", "make_mask",
           "positions_from_segment_ids", "rope"]
