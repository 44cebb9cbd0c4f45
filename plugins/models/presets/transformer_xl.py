"""Transformer-XL presets (Dai et al. 2019): relative attention + segment memory."""

from fairseq.models import register_model_architecture

from .common import defaults as _defaults
from .full import full_enwik8, full_ptb, full_small, full_tiny


def _xl(args, **values):
    _defaults(args, attention="relative", pos_emb="relative", **values)


@register_model_architecture("efficient_lm", "xl_tiny")
def xl_tiny(args):
    """full_tiny with relative attention and a 64-position memory: tests, CPU smoke runs."""
    _xl(args, mem_len=64)
    full_tiny(args)


@register_model_architecture("efficient_lm", "xl_small")
def xl_small(args):
    """full_small with Transformer-XL attention and memory (the quickstart's twin)."""
    _xl(args, mem_len=256)
    full_small(args)


@register_model_architecture("efficient_lm", "xl_ptb")
def xl_ptb(args):
    """The full_ptb size with relative attention and memory (the paper's PTB setup is not in the official
    scripts; this is the one-flag-apart twin for the word-level comparison)."""
    _xl(args, mem_len=128)
    full_ptb(args)


@register_model_architecture("efficient_lm", "xl_enwik8_base")
def xl_enwik8_base(args):
    """Official pytorch/run_enwik8_base.sh: 12 layers, d_model 512, 8 heads, d_inner 2048, dropout 0.1,
    dropatt 0.0, post-norm, tgt_len 512 (--tokens-per-sample), mem_len 512."""
    _xl(args, mem_len=512)
    full_enwik8(args)


@register_model_architecture("efficient_lm", "xl_enwik8_large")
def xl_enwik8_large(args):
    """Dai et al. 2019 Table 2, 24-layer model (277M): d_model 1024, 16 heads, d_inner 3072, dropout and
    dropatt 0.15, tgt_len = mem_len = 768 (official TPU scripts)."""
    _xl(args, mem_len=768, decoder_layers=24, decoder_embed_dim=1024, decoder_ffn_embed_dim=3072,
        decoder_attention_heads=16, dropout=0.15, attention_dropout=0.15)  # fmt: skip


@register_model_architecture("efficient_lm", "xl_text8_large")
def xl_text8_large(args):
    """Dai et al. 2019 Table 3: the enwik8 large model trained on text8."""
    xl_enwik8_large(args)


@register_model_architecture("efficient_lm", "xl_wt103_base")
def xl_wt103_base(args):
    """Official pytorch/run_wt103_base.sh: 16 layers, d_model 410, 10 heads, d_inner 2100, dropout 0.1,
    tgt_len = mem_len = 150, adaptive input and softmax with cutoffs 20000,40000,200000, div_val 1
    (--adaptive-*-factor 1), tied weights and projections."""
    _xl(args, mem_len=150, decoder_layers=16, decoder_embed_dim=410, decoder_ffn_embed_dim=2100,
        decoder_attention_heads=10, dropout=0.1, attention_dropout=0.0, adaptive_input=True,
        adaptive_input_factor=1, adaptive_input_cutoff="20000,40000,200000",
        adaptive_softmax_cutoff="20000,40000,200000", adaptive_softmax_factor=1, tie_adaptive_weights=True,
        tie_adaptive_proj=True)  # fmt: skip


@register_model_architecture("efficient_lm", "xl_wt103_large")
def xl_wt103_large(args):
    """Dai et al. 2019 Table 1, 18-layer model (257M), official run_wt103_large.sh: d_model 1024, 16 heads,
    d_inner 4096, dropout and dropatt 0.2, tgt_len = mem_len = 384, adaptive div_val 4."""
    _xl(args, mem_len=384, decoder_layers=18, decoder_embed_dim=1024, decoder_ffn_embed_dim=4096,
        decoder_attention_heads=16, dropout=0.2, attention_dropout=0.2, adaptive_input=True,
        adaptive_input_factor=4, adaptive_input_cutoff="20000,40000,200000",
        adaptive_softmax_cutoff="20000,40000,200000", adaptive_softmax_factor=4, tie_adaptive_weights=True,
        tie_adaptive_proj=True)  # fmt: skip
