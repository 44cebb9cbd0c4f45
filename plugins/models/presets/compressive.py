"""Compressive Transformer presets (Rae et al. 2020, arXiv 1911.05507): Transformer-XL attention over
[compressed memory; memory; segment] (``--attention compressive``). Table numbers are the arXiv v1's:
Table 3 enwik8, Table 4 WikiText-103, Table 5 the compression-function ablation. The segment length
(``--tokens-per-sample``) and the optimizer are set by ``recipes/compressive/run.sh``."""

from fairseq.models import register_model_architecture

from .common import defaults as _defaults
from .transformer_xl import xl_enwik8_large, xl_small, xl_tiny, xl_wt103_large


def _compressive(args, **values):
    """conv compression trained with the attention-reconstruction loss: the paper's best (Table 5)."""
    _defaults(args, attention="compressive", pos_emb="relative", compression_fn="conv",
              compression_loss="attention_reconstruction", **values)  # fmt: skip


@register_model_architecture("efficient_lm", "compressive_tiny")
def compressive_tiny(args):
    """xl_tiny (2 layers x 64) with memory 32 and 16 compressed slots at c = 4 (a span of 32 + 64 past
    positions): tests and CPU smoke runs (ours)."""
    _compressive(args, mem_len=32, cmem_len=16, compression_rate=4)
    xl_tiny(args)


@register_model_architecture("efficient_lm", "compressive_small")
def compressive_small(args):
    """xl_small (4 layers x 128) with memory 128 and 32 compressed slots at c = 4: the same span of 256 past
    positions as xl_small's memory of 256, over 160 keys instead of 256 (ours; the CPU PTB-chars recipe)."""
    _compressive(args, mem_len=128, cmem_len=32, compression_rate=4)
    xl_small(args)


@register_model_architecture("efficient_lm", "compressive_enwik8")
def compressive_enwik8(args):
    """The base model of this project's studies (issue 4): 8 layers, 8 heads, d_model 512, FFN 2048
    (Transformer-XL base widths, run_enwik8_base.sh), segment 512, memory 512, compressed memory 512 at
    c = 4 (a span of 512 + 2048 past positions); Adam lr 1e-4 in the recipe."""
    _compressive(args, mem_len=512, cmem_len=512, compression_rate=4, decoder_layers=8, decoder_embed_dim=512,
                 decoder_ffn_embed_dim=2048, decoder_attention_heads=8, dropout=0.1, attention_dropout=0.0)  # fmt: skip


@register_model_architecture("efficient_lm", "compressive_enwik8_large")
def compressive_enwik8_large(args):
    """Rae et al. 2020 Sec. 5.2 / Table 3 (0.97 bpc, 277M): the 24-layer Transformer-XL of Dai et al.
    (d_model 1024, 16 heads, FFN 3072) with memory 768 and compressed memory 1152 at c = 3."""
    _compressive(args, mem_len=768, cmem_len=1152, compression_rate=3)
    xl_enwik8_large(args)


@register_model_architecture("efficient_lm", "compressive_wt103")
def compressive_wt103(args):
    """Rae et al. 2020 Sec. 5.3 / Table 4 (17.1 test ppl): 18 layers, d_model 1024, 16 heads, FFN 4096,
    adaptive input and softmax (the Transformer-XL large model), memory 500, compressed memory 1500 at
    c = 4, segment 512."""
    _compressive(args, mem_len=500, cmem_len=1500, compression_rate=4)
    xl_wt103_large(args)
