"""Adaptive attention span (Sukhbaatar et al. 2019, arXiv 1905.07799) and all-attention / persistent memory
(Sukhbaatar et al. 2019, arXiv 1907.01470) presets, from the official facebookresearch/adaptive-span
experiments/*.sh.

How the official options map to ours: ``--attn-span`` -> ``--max-span`` (and ``--mem-len``, the cache
bound: the official code caches at most attn-span positions), ``--adapt-span-loss`` -> ``--span-loss-weight``,
ramp 32 (official default), ``--pers-mem-size`` -> ``--persistent-mem-size``, ``--inner-hid-sz 1`` with
persistent memory -> ``--decoder-ffn-embed-dim 0`` (the official layer drops its feed-forward sublayer).
The official ``--dropout`` applies to the attention weights and the feed-forward hidden layer only, i.e.
our ``--attention-dropout`` and ``--activation-dropout``; the residual branches have none (``--dropout 0``).
Official layers are post-norm. The official window is ``--span-window official`` (query t attends the S
positions before it, not itself, and every stream starts with a cache of S zero vectors: models.py /
train.py), the default of every preset copied from an official script; the ``*_tiny`` presets keep the
project's ``inclusive`` window (itself and the S - 1 before it). ``--block-sz`` is the task's ``--tokens-per-sample`` (512 for enwik8/text8,
256 for WikiText-103) and the optimizer is set in recipes/adaptive_span/run.sh.
"""

from fairseq.models import register_model_architecture

from .common import defaults as _defaults
from .full import full_tiny


def _adaptive(args, max_span: int, dropout: float, **values):
    _defaults(args, attention="adaptive_span", pos_emb="relative", max_span=max_span, mem_len=max_span,
              span_ramp=32, span_init=0.0, dropout=0.0, attention_dropout=dropout, activation_dropout=dropout,
              decoder_normalize_before=False, span_window="official", **values)  # fmt: skip


@register_model_architecture("efficient_lm", "adaptive_span_tiny")
def adaptive_span_tiny(args):
    """full_tiny with adaptive span up to 256 positions (tests, CPU smoke runs; no paper number)."""
    _defaults(args, attention="adaptive_span", pos_emb="relative", max_span=256, mem_len=256, span_ramp=32)
    full_tiny(args)


@register_model_architecture("efficient_lm", "adaptive_span_enwik8_small")
def adaptive_span_enwik8_small(args):
    """Official experiments/enwik8.sh (paper: 12 layers, 38M, 1.02 bpb on enwik8): d 512, 8 heads, FFN 2048,
    attn-span 8192, block 512, dropout 0.3, adapt-span-loss 5e-7 (the 2e-6 of experiments/enwik8_small.sh
    belongs to its 8-layer d256 span-1024 demo model)."""
    _adaptive(args, max_span=8192, dropout=0.3, span_loss_weight=5e-7, decoder_layers=12, decoder_embed_dim=512,
              decoder_ffn_embed_dim=2048, decoder_attention_heads=8)  # fmt: skip


@register_model_architecture("efficient_lm", "adaptive_span_enwik8_large")
def adaptive_span_enwik8_large(args):
    """Official experiments/enwik8_large.sh (paper: 24 layers, 209M, 0.98 bpb): d 768, 8 heads,
    FFN 4096, attn-span 8192, block 512, dropout 0.4, adapt-span-loss 5e-7."""
    _adaptive(args, max_span=8192, dropout=0.4, span_loss_weight=5e-7, decoder_layers=24, decoder_embed_dim=768,
              decoder_ffn_embed_dim=4096, decoder_attention_heads=8)  # fmt: skip


@register_model_architecture("efficient_lm", "adaptive_span_text8_small")
def adaptive_span_text8_small(args):
    """Official experiments/text8.sh (paper: 12 layers, 38M, 1.11 bpc): the enwik8 small model."""
    adaptive_span_enwik8_small(args)


@register_model_architecture("efficient_lm", "adaptive_span_text8_large")
def adaptive_span_text8_large(args):
    """Official experiments/text8_large.sh (paper: 24 layers, 209M, 1.07 bpc): the enwik8 large model."""
    adaptive_span_enwik8_large(args)


@register_model_architecture("efficient_lm", "all_attention_tiny")
def all_attention_tiny(args):
    """adaptive_span_tiny with all-attention layers: 16 persistent slots per head, no feed-forward."""
    _defaults(args, persistent_mem_size=16, decoder_ffn_embed_dim=0)
    adaptive_span_tiny(args)


@register_model_architecture("efficient_lm", "all_attention_enwik8_small")
def all_attention_enwik8_small(args):
    """Official experiments/enwik8_pers_small.sh (all-attention paper: 18 layers, 39M, 1.01 bpb):
    d 512, 8 heads, no FFN, 1024 persistent slots, attn-span 8192, block 512, dropout 0.3, span loss 1e-7."""
    _adaptive(args, max_span=8192, dropout=0.3, span_loss_weight=1e-7, persistent_mem_size=1024,
              decoder_layers=18, decoder_embed_dim=512, decoder_ffn_embed_dim=0, decoder_attention_heads=8)  # fmt: skip


@register_model_architecture("efficient_lm", "all_attention_enwik8_large")
def all_attention_enwik8_large(args):
    """Official experiments/enwik8_pers.sh (all-attention paper: 36 layers, 114M, 0.98 bpb):
    d 512, 8 heads, no FFN, 2048 persistent slots, attn-span 8192, block 512, dropout 0.4, span loss 1e-7."""
    _adaptive(args, max_span=8192, dropout=0.4, span_loss_weight=1e-7, persistent_mem_size=2048,
              decoder_layers=36, decoder_embed_dim=512, decoder_ffn_embed_dim=0, decoder_attention_heads=8)  # fmt: skip


@register_model_architecture("efficient_lm", "all_attention_wt103")
def all_attention_wt103(args):
    """Official experiments/wiki103_pers.sh (all-attention paper: 36 layers, 133M, 20.6 ppl): d 512,
    8 heads, no FFN, 2048 persistent slots, attn-span 2048, block 256, dropout 0.3, span loss 5e-7, tied
    adaptive input/softmax (official adaptive_io.py with its default cutoffs 20000,40000,200000 and
    div_val 4). Its --emb-dropout 0.1 has no exact twin here (our --dropout also hits the residuals)."""
    _adaptive(args, max_span=2048, dropout=0.3, span_loss_weight=5e-7, persistent_mem_size=2048,
              decoder_layers=36, decoder_embed_dim=512, decoder_ffn_embed_dim=0, decoder_attention_heads=8,
              adaptive_input=True, adaptive_input_factor=4, adaptive_input_cutoff="20000,40000,200000",
              adaptive_softmax_cutoff="20000,40000,200000", adaptive_softmax_factor=4, tie_adaptive_weights=True,
              tie_adaptive_proj=True)  # fmt: skip
