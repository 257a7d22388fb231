"""The attention kernel training uses: SDPA on GPUs; on CPU, SDPA per document of a padding-free packed batch."""

from __future__ import annotations


def attn_implementation() -> str:
    """"sdpa" on GPUs; on CPU "sdpa_varlen" (registered here): SDPA per packed document, see `_varlen_sdpa`."""
    import torch

    if torch.cuda.is_available():
        return "sdpa"
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_SDPA, _varlen_sdpa)
    AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)  # padded batches and generation keep SDPA's own masks
    return VARLEN_SDPA


VARLEN_SDPA = "sdpa_varlen"


def _varlen_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, cu_seq_lens_q=None, **kwargs):
    """Causal SDPA on each document of a padding-free packed batch (one row; TRL's collator passes `cu_seq_lens_q`).

    The same result as SDPA with the block-diagonal mask transformers builds from the restarting position_ids, but with
    an explicit mask CPU SDPA computes the whole row x row score matrix (~1k x 1k per layer for 4 x 256-token blocks):
    its backward alone was ~17% of an SFT step. Per document it costs each document's length squared, on the unmasked
    causal kernel. (torch's varlen_attn and flash-attn are CUDA-only.) Anything else goes to transformers' SDPA.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[0] != 1 or query.shape[2] != key.shape[2] or not getattr(module, "is_causal", True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    lengths = cu_seq_lens_q.diff().tolist()
    gqa = query.shape[1] != key.shape[1]
    # fp32 even under bf16 autocast: CPU flash attention's bf16 backward is slower than its fp32 one (measured 4.7 vs
    # 3.8 ms fwd+bwd per 256-token document), and RoPE has already made q and k fp32. split, not slicing: its backward
    # concatenates instead of zero-filling a full-size gradient per document.
    with torch.autocast("cpu", enabled=False):
        out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
            for q, k, v in zip(*(t.float().split(lengths, dim=2) for t in (query, key, value)))], dim=2)
    return out.to(value.dtype).transpose(1, 2).contiguous(), None  # bf16 under autocast: o_proj's input dtype
