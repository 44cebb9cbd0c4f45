"""Sparse Transformer presets (Child et al. 2019): factorized sparse attention (``--attention sparse``)."""

from fairseq.models import register_model_architecture

from .common import defaults as _defaults
from .full import full_tiny


@register_model_architecture("efficient_lm", "sparse_tiny")
def sparse_tiny(args):
    """full_tiny with the fixed pattern at stride 8 (2 summary positions per block, merged heads, blocks of
    4): the pattern is really sparse at the tests' 32-token segments. Ours, for tests and CPU smoke runs."""
    _defaults(args, attention="sparse", sparse_pattern="fixed", sparse_stride=8, sparse_block=4, sparse_summary=2,
              sparse_heads="merged")  # fmt: skip
    full_tiny(args)


@register_model_architecture("efficient_lm", "sparse_enwik8")
def sparse_enwik8(args):
    """Child et al. 2019, Sec. 7.3 (EnWik8): a 30-layer fixed Sparse Transformer, d_model 512, 8 heads, stride
    128, c = 32, merged factorized heads, dropout 0.4, context 12,288 (pass ``--tokens-per-sample 12288``:
    the length is a task option). As in the paper (Sec. 5.1-5.4): pre-activation residual blocks, GELU,
    feed-forward 4 x d_model, attention recomputed in the backward pass. Blocks of 32 (openai/sparse_attention's
    default block size)."""
    _defaults(args, attention="sparse", sparse_pattern="fixed", sparse_stride=128, sparse_block=32,
              sparse_summary=32, sparse_heads="merged", sparse_checkpoint=True, decoder_layers=30,
              decoder_embed_dim=512, decoder_ffn_embed_dim=2048, decoder_attention_heads=8,
              decoder_normalize_before=True, activation_fn="gelu", dropout=0.4, attention_dropout=0.0)  # fmt: skip
