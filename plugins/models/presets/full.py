"""Full (vanilla softmax) attention presets: the baselines every mechanism is compared with."""

from fairseq.models import register_model_architecture

from .common import defaults as _defaults


@register_model_architecture("efficient_lm", "full_tiny")
def full_tiny(args):
    """Trains in seconds on a CPU: tests, the quickstart, smoke runs."""
    _defaults(args, decoder_layers=2, decoder_embed_dim=64, decoder_ffn_embed_dim=256, decoder_attention_heads=4,
              decoder_normalize_before=True, dropout=0.0, share_decoder_input_output_embed=True)  # fmt: skip


@register_model_architecture("efficient_lm", "full_small")
def full_small(args):
    """Quickstart-sized: 4 layers x 128, about 1M parameters on a byte vocabulary."""
    _defaults(args, decoder_layers=4, decoder_embed_dim=128, decoder_ffn_embed_dim=512, decoder_attention_heads=4,
              decoder_normalize_before=True, dropout=0.1, share_decoder_input_output_embed=True)  # fmt: skip


@register_model_architecture("efficient_lm", "full_enwik8")
def full_enwik8(args):
    """Vanilla-attention twin of Transformer-XL's enwik8 base model (Dai et al. 2019, official
    run_enwik8_base.sh: 12 layers, d_model 512, 8 heads, d_inner 2048, dropout 0.1)."""
    _defaults(args, decoder_layers=12, decoder_embed_dim=512, decoder_ffn_embed_dim=2048, decoder_attention_heads=8,
              dropout=0.1, attention_dropout=0.0)  # fmt: skip


@register_model_architecture("efficient_lm", "full_wt103")
def full_wt103(args):
    """Baevski & Auli 2019 (fairseq's transformer_lm_wiki103): 16 layers x 1024, 8 heads, FFN 4096,
    pre-norm, adaptive input + tied adaptive softmax with cutoffs 20000,60000, dropout 0.3."""
    _defaults(args, decoder_layers=16, decoder_embed_dim=1024, decoder_ffn_embed_dim=4096, decoder_attention_heads=8,
              decoder_normalize_before=True, dropout=0.3, attention_dropout=0.1, activation_dropout=0.1,
              adaptive_input=True, adaptive_input_cutoff="20000,60000", adaptive_softmax_cutoff="20000,60000",
              adaptive_softmax_dropout=0.2, tie_adaptive_weights=True, tie_adaptive_proj=True)  # fmt: skip


@register_model_architecture("efficient_lm", "full_ptb")
def full_ptb(args):
    """Word-level PTB/WikiText-2 size (our choice, no paper preset): 4 layers x 256, heavy dropout
    because PTB overfits within a few epochs; tied embeddings as in Press & Wolf 2017."""
    _defaults(args, decoder_layers=4, decoder_embed_dim=256, decoder_ffn_embed_dim=1024, decoder_attention_heads=4,
              decoder_normalize_before=True, dropout=0.3, attention_dropout=0.1,
              share_decoder_input_output_embed=True)  # fmt: skip


@register_model_architecture("efficient_lm", "full_wt2")
def full_wt2(args):
    """WikiText-2: the PTB preset (same data scale, 2M tokens)."""
    full_ptb(args)
