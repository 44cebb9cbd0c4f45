"""Linear attention presets (Katharopoulos et al. 2020): the ``full_*`` presets with ``--attention linear``
and nothing else changed, so ``--arch linear_X`` vs ``--arch full_X`` is the linear-vs-full comparison at
identical size (the paper compares at equal size too, Sec. 4).

Positions stay those of the twin (sinusoidal). To carry the state across segments (unbounded context),
add ``--mem-len 1 --pos-emb none``: absolute positions would restart every segment, and NoPE is sound for
linear attention because its causal sums already order the tokens."""

from fairseq.models import register_model_architecture

from .common import defaults as _defaults
from .full import full_enwik8, full_ptb, full_tiny, full_wt2


def _linear(args):
    _defaults(args, attention="linear", feature_map="elu")  # elu + 1: the paper's feature map (Sec. 3.2.1)


@register_model_architecture("efficient_lm", "linear_tiny")
def linear_tiny(args):
    """``full_tiny`` with linear attention: trains in seconds on a CPU (tests, smoke runs)."""
    _linear(args)
    full_tiny(args)


@register_model_architecture("efficient_lm", "linear_ptb")
def linear_ptb(args):
    """``full_ptb`` (4 layers x 256, our word-level PTB size) with linear attention."""
    _linear(args)
    full_ptb(args)


@register_model_architecture("efficient_lm", "linear_wt2")
def linear_wt2(args):
    """``full_wt2`` (the PTB size on WikiText-2) with linear attention."""
    _linear(args)
    full_wt2(args)


@register_model_architecture("efficient_lm", "linear_enwik8")
def linear_enwik8(args):
    """``full_enwik8`` (Transformer-XL enwik8 base size: 12 x 512, 8 heads) with linear attention."""
    _linear(args)
    full_enwik8(args)
