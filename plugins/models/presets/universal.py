"""Universal Transformer presets (Dehghani et al. 2019, "Universal Transformers", ICLR): one layer's
weights applied at every depth step (``--share-layers``) with the timestep signal added before each step
(``--share-layers-timestep-emb``, Sec. 2.1). Fixed depth: the paper's adaptive computation time (ACT,
Sec. 2.2) is not implemented.

Compute vs parameters: D steps of one shared layer cost exactly the FLOPs of D unshared layers; only the
parameters of one layer are stored (see README, "Universal Transformer")."""

from fairseq.models import register_model_architecture

from .common import defaults as _defaults
from .full import full_small, full_tiny


@register_model_architecture("efficient_lm", "universal_tiny")
def universal_tiny(args):
    """full_tiny's width (d 64, FFN 256, 4 heads) with one shared layer applied 4 times: full_tiny x 2 the
    FLOPs per token at fewer parameters than full_tiny (ours, for tests and CPU runs)."""
    _defaults(args, share_layers=True, share_layers_timestep_emb=True, decoder_layers=4)
    full_tiny(args)


@register_model_architecture("efficient_lm", "universal_small")
def universal_small(args):
    """full_small's width (d 128, FFN 512) with one shared layer applied 4 times (full_small's depth):
    the same FLOPs as full_small at about a third of its non-embedding parameters (ours)."""
    _defaults(args, share_layers=True, share_layers_timestep_emb=True, decoder_layers=4)
    full_small(args)
