"""``--optimizer adagrad_clip``: Adagrad (Duchi et al. 2011) with the per-parameter gradient clipping of the
official adaptive-span code (facebookresearch/adaptive-span adagrad_with_grad_clip.py), used by every
adaptive-span and all-attention experiment (``--optim adagrad --grad-clip 0.03``)::

    G_p   <- G_p + g_p * g_p                                   (unclipped squares)
    theta <- theta - lr * min(1, c / ||g_p||) * g_p / (sqrt(G_p) + 1e-10)

for every parameter tensor p separately (c = ``--adagrad-clip``). fairseq's own ``--optimizer adagrad``
with ``--clip-norm`` clips one global norm instead, and it is a legacy optimizer whose options are saved as
an ``argparse.Namespace``, which ``torch.load(weights_only=True)`` (the default of torch >= 2.6, used by
``fairseq-eval-lm``) refuses; this one has a dataclass config, so its checkpoints load.
"""

from dataclasses import dataclass, field
from typing import List

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.optim import FairseqOptimizer, register_optimizer
from omegaconf import II


class ClippedAdagrad(torch.optim.Optimizer):
    def __init__(self, params, lr: float, weight_decay: float = 0.0, grad_clip: float = 0.0):
        if lr < 0 or weight_decay < 0 or grad_clip < 0:
            raise ValueError(f"lr, weight_decay and grad_clip must be >= 0, got {lr}, {weight_decay}, {grad_clip}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, grad_clip=grad_clip))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"] != 0:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["sum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["sum"].addcmul_(grad, grad)
                step = grad / (state["sum"].sqrt() + 1e-10)
                if group["grad_clip"] > 0:  # scale this tensor's step, not the accumulated squares
                    step = step * (group["grad_clip"] / (grad.norm() + 1e-10)).clamp(max=1.0)
                p.add_(step, alpha=-group["lr"])
        return loss


@dataclass
class AdagradClipConfig(FairseqDataclass):
    adagrad_clip: float = field(
        default=0.03,
        metadata={"help": "clip the gradient norm of every parameter tensor to this, by scaling its step "
                  "(0: off); official adaptive-span --grad-clip 0.03"},
    )  # fmt: skip
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay"})
    lr: List[float] = II("optimization.lr")


@register_optimizer("adagrad_clip", dataclass=AdagradClipConfig)
class FairseqClippedAdagrad(FairseqOptimizer):
    def __init__(self, cfg: AdagradClipConfig, params):
        super().__init__(cfg)
        self._optimizer = ClippedAdagrad(params, **self.optimizer_config)

    @property
    def optimizer_config(self):
        """Options that override those saved in a checkpoint (e.g. a new learning rate when fine-tuning)."""
        lr = self.cfg.lr if isinstance(self.cfg.lr, (int, float)) else self.cfg.lr[0]  # a list (ListConfig) in fairseq
        return {"lr": lr, "weight_decay": self.cfg.weight_decay, "grad_clip": self.cfg.adagrad_clip}

    @property
    def supports_flat_params(self):
        return False
