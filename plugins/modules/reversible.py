"""Reversible residual layers (Kitaev et al. 2020, "Reformer", Sec. 3; RevNets, Gomez et al. 2017).

Every decoder layer becomes a reversible coupling of its two (pre-norm) sublayers:

    Y1 = X1 + F(X2),   F(x) = Drop(Attn(LN(x)))
    Y2 = X2 + G(Y1),   G(x) = Drop(FFN(LN(x)))        (G = 0 without a feed-forward sublayer)

whose inputs can be recomputed from its outputs, X2 = Y2 - G(Y1) and X1 = Y1 - F(X2). The stream starts
duplicated, X1 = X2 = x (the paper's and trax's ``Dup``), and ends as the mean (Y1 + Y2) / 2
(reformer-pytorch; trax concatenates the halves instead), so the model width stays D and the same layers
and final norm are used with or without ``--reversible``.

Training (``ReversibleStack``, one ``torch.autograd.Function`` over the whole stack) stores only the
last layer's outputs: the backward pass walks the layers from the top, recomputes each layer's inputs
and its activations and back-propagates through that one layer, so activation memory does not grow with
depth. Every recomputation replays the forward pass's random numbers: the torch RNG state (CPU and the
input's CUDA device) is saved before each F and each G and restored when it is recomputed, so dropout
masks and LSH rotations (drawn from the same RNG) are identical; autocast is replayed as well. This
requires attentions whose output is a function of their input and the RNG state
(``Attention.deterministic_recompute``), and no memory (``--mem-len``).

With ``--ffn-chunks K`` G is computed, and in the backward pass recomputed and back-propagated, in K
pieces along the sequence (Sec. 3, "Chunking"): the FFN's B x T x ffn_dim activation then never
exists for more than one piece.

Without gradients, or with memory/incremental state (generation), the same coupling runs as a plain
loop (``coupled_layers``): the identical function, with state, and nothing to store.

Shape legend: B = batch, T = positions, D = model dim.
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..memory import TensorState
from .decoder_layer import DecoderLayer


def attention_branch(layer: DecoderLayer, x: Tensor, mem: Optional[TensorState], keep: Optional[int]):
    """F(x) = Drop(Attn(LN(x))) and the attention's next memory (LN applied by the attention, to the
    memory's raw inputs too: ``DecoderLayer``)."""
    out, new_mem = layer.attn(x, mem, keep, norm=layer.attn_norm)
    return layer.dropout(out), new_mem


def feedforward_parts(layer: DecoderLayer, x: Tensor) -> Tuple[Tensor, ...]:
    """x split along T into the ``--ffn-chunks`` pieces G is computed on (one piece without chunking)."""
    chunks = getattr(layer.ffn, "chunks", 1)
    return x.chunk(chunks, dim=1) if chunks > 1 and x.size(1) > 1 else (x,)


def feedforward_piece(layer: DecoderLayer, x: Tensor) -> Tensor:
    """G on one piece of the sequence: every operation in it is position-wise."""
    if layer.ffn is None:
        return torch.zeros_like(x)
    return layer.dropout(layer.ffn.position_wise(layer.ffn_norm(x)))


def feedforward_branch(layer: DecoderLayer, x: Tensor) -> Tensor:
    """G(x) = Drop(FFN(LN(x))), piece by piece with --ffn-chunks (0 for a layer without feed-forward)."""
    return torch.cat([feedforward_piece(layer, part) for part in feedforward_parts(layer, x)], dim=1)


def coupled_layers(
    layers: Sequence[DecoderLayer], x: Tensor, past: Sequence[Optional[TensorState]], keep: Optional[int]
) -> Tuple[Tensor, List[Optional[TensorState]]]:
    """The reversible network computed plainly (stores activations; supports memory and generation)."""
    x1, x2, new_mems = x, x, []
    for layer, mem in zip(layers, past):
        f, new_mem = attention_branch(layer, x2, mem, keep)
        x1 = x1 + f
        x2 = x2 + feedforward_branch(layer, x1)
        new_mems.append(new_mem)
    return (x1 + x2) / 2, new_mems


class _RNGState:
    """The torch RNG state (CPU, and the CUDA device of ``device`` if any) at one point of the forward."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state, self.device)


class ReversibleStack(torch.autograd.Function):
    """x (B x T x D) -> (Y1 + Y2) / 2 through ``layers``; the parameters are passed so that their
    gradients are returned (works with ``backward()`` and ``torch.autograd.grad`` alike)."""

    @staticmethod
    def forward(ctx, x: Tensor, layers: Sequence[DecoderLayer], *params: Tensor) -> Tensor:
        ctx.layers, ctx.params = layers, params
        ctx.autocast = (x.device.type, torch.is_autocast_enabled(x.device.type),
                        torch.get_autocast_dtype(x.device.type))  # fmt: skip
        ctx.rng = []
        x1, x2 = x, x
        with torch.no_grad():
            for layer in layers:
                rng_f = _RNGState(x.device)
                x1 = x1 + attention_branch(layer, x2, None, 0)[0]
                rng_g = _RNGState(x.device)
                x2 = x2 + feedforward_branch(layer, x1)
                ctx.rng.append((rng_f, rng_g))
        ctx.save_for_backward(x1, x2)  # the only activations kept: the top layer's outputs
        return (x1 + x2) / 2

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        y1, y2 = ctx.saved_tensors
        dy1 = dy2 = grad_out / 2
        index = {id(p): i for i, p in enumerate(ctx.params)}
        grads: List[Optional[Tensor]] = [None] * len(ctx.params)
        device_type, autocast, dtype = ctx.autocast
        devices = [y1.device] if y1.device.type == "cuda" else []

        def accumulate(params, param_grads):
            for p, g in zip(params, param_grads):
                if g is not None:
                    i = index[id(p)]
                    grads[i] = g if grads[i] is None else grads[i] + g

        with torch.random.fork_rng(devices=devices):  # the caller's RNG is left as it was
            for layer, (rng_f, rng_g) in zip(reversed(ctx.layers), reversed(ctx.rng)):
                params = [p for p in layer.parameters() if p.requires_grad]
                # G: recompute from Y1 and back-propagate dY2 one --ffn-chunks piece at a time (G is
                # position-wise, so only one piece's activations exist at once; the pieces draw their
                # random numbers in the forward order); then X2 = Y2 - G(Y1), dX1 = dY1 + dG/dY1.
                rng_g.restore()
                g_pieces, dg_pieces = [], []
                for piece, d_piece in zip(feedforward_parts(layer, y1), feedforward_parts(layer, dy2)):
                    piece = piece.detach().requires_grad_()
                    with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=autocast):
                        g = feedforward_piece(layer, piece)
                    if g.requires_grad:
                        g_grads = torch.autograd.grad(g, [piece, *params], d_piece, allow_unused=True)
                        accumulate(params, g_grads[1:])
                        dg = g_grads[0]
                    else:  # no feed-forward sublayer: G = 0
                        dg = torch.zeros_like(piece)
                    g_pieces.append(g.detach())
                    dg_pieces.append(dg)
                with torch.no_grad():
                    x2 = y2 - torch.cat(g_pieces, dim=1)
                    dx1 = dy1 + torch.cat(dg_pieces, dim=1)
                # F: recompute from X2, back-propagate dX1; then X1 = Y1 - F(X2), dX2 = dY2 + dF/dX2.
                x2 = x2.detach().requires_grad_()
                rng_f.restore()
                with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=autocast):
                    f = attention_branch(layer, x2, None, 0)[0]
                f_grads = torch.autograd.grad(f, [x2, *params], dx1, allow_unused=True)
                accumulate(params, f_grads[1:])
                with torch.no_grad():
                    x1 = y1 - f
                    dx2 = dy2 + f_grads[0]
                y1, y2, dy1, dy2 = x1, x2, dx1, dx2
        return (dy1 + dy2, None, *grads)  # X1 = X2 = x: both streams' gradients reach the input


def reversible_layers(
    layers: Sequence[DecoderLayer], x: Tensor, past: Sequence[Optional[TensorState]], keep: Optional[int]
) -> Tuple[Tensor, List[Optional[TensorState]]]:
    """Run the layers as a reversible network: memory-saving backward when training without state,
    the plain coupled loop otherwise (same function)."""
    if torch.is_grad_enabled() and keep == 0 and all(m is None for m in past):
        params = list(dict.fromkeys(p for layer in layers for p in layer.parameters() if p.requires_grad))
        return ReversibleStack.apply(x, list(layers), *params), [None] * len(layers)
    return coupled_layers(layers, x, past, keep)
