"""Reformer presets (Kitaev et al. 2020): shared-QK LSH attention, reversible layers, chunked feed-forward."""

from fairseq.models import register_model_architecture

from .common import defaults as _defaults


@register_model_architecture("efficient_lm", "reformer_tiny")
def reformer_tiny(args):
    """Trains in seconds on a CPU (tests, smoke runs): 2 layers x 64, LSH with 2 rounds, buckets of 8 and
    chunks of 16 (so 32-token segments are really hashed and chunked), reversible, FFN in 2 chunks."""
    _defaults(args, attention="lsh", lsh_n_hashes=2, lsh_bucket_size=8, lsh_chunk_size=16, reversible=True,
              ffn_chunks=2, decoder_layers=2, decoder_embed_dim=64, decoder_ffn_embed_dim=256,
              decoder_attention_heads=4, decoder_normalize_before=True, dropout=0.0,
              share_decoder_input_output_embed=True)  # fmt: skip


@register_model_architecture("efficient_lm", "reformer_enwik8")
def reformer_enwik8(args):
    """The official trax config ``trax/supervised/configs/reformer_enwik8.gin`` (the paper's enwik8-64K
    model, Sec. 5): 12 reversible layers, d_model 1024 and d_ff 4096 (the config's "if more memory is
    available" values; 768 / 2048 otherwise), 8 heads, dropout 0.2 and attention dropout 0.2, relu, LSH
    with 2 hashes, chunk_len 256 and 512 buckets over 65,536 positions (average bucket size 128).
    Train with ``--tokens-per-sample 65536``. Differences: every layer is LSH here (the config mixes in
    local chunked attention: [SelfAttention, SelfAttention, LSH, SelfAttention] repeated), positions are
    sinusoidal (the config uses axial position embeddings), and the head dimension is D / heads (the
    config's d_attention_key is 64). ``--ffn-chunks 16`` is ours (the config sets no feed-forward chunking)."""
    _defaults(args, attention="lsh", lsh_n_hashes=2, lsh_bucket_size=128, lsh_chunk_size=256, reversible=True,
              ffn_chunks=16, decoder_layers=12, decoder_embed_dim=1024, decoder_ffn_embed_dim=4096,
              decoder_attention_heads=8, decoder_normalize_before=True, dropout=0.2, attention_dropout=0.2,
              activation_fn="relu")  # fmt: skip
