"""Evaluation without gradients (issue 18: memory evaluation >= 300x stride-1 sliding windows): the no-grad
path of ``distance_bias.py`` (``distance_bias_inference``) and the reused position-key table of relative
attention (``relative.py``, ``PositionKeyCache``) compute the same function as the training path.

- the no-grad path against the autograd path (``DistanceBiasAttention``) to float precision, with a window, an
  additive term per distance, one position table for all heads, persistent slots and the key usage, and against
  the paper's equation (float64);
- it multiplies no column the chunk does not see (the old path multiplied the C - 1 negative distances and the
  distances beyond the window too);
- the position keys are projected once per shape without gradient, recomputed after any change of W_R
  (including a write through ``.data``, which the version counter does not see), never reused with gradient;
- whole models: segments with memory under ``torch.no_grad`` (cached keys/values and positions, the no-grad
  path) equal the same segments with gradient enabled (the training path) and the one-pass reference.

Shapes: B = batch, H = heads, T = queries (the last T of the S keys), S = keys, N = slots, Dh = head dim.
"""

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from plugins.attention import build_attention, distance_bias
from plugins.attention.distance_bias import DistanceBiasAttention, distance_bias_attention, position_rows
from tests.test_distance_bias import relative_reference
from tests.test_transformer_xl import EXACT64, recurrence_window, reference_forward, run_segments, tokens, xl_lm

D, H = 16, 2


@pytest.fixture(autouse=True)
def every_size_takes_the_route(monkeypatch):
    """The tests' tiny shapes are below ``MIN_SCORE_ELEMENTS``, where the layers take the former route."""
    monkeypatch.setattr(distance_bias, "MIN_SCORE_ELEMENTS", 0)


NO_GRAD_CASES = {  # name: (heads in the table G, additive term per distance, window, slots N, usage, T, S, chunk)
    "causal": (H, False, None, 0, False, 9, 9, 4),
    "memory-window": (H, False, 5, 0, False, 8, 15, 3),
    "one-table-colbias-window": (1, True, 4, 0, False, 7, 12, 7),
    "slots-window-usage": (H, True, 6, 2, True, 9, 16, 2),
    "memory-no-window-usage": (H, False, None, 0, True, 6, 14, 4),
    "window-covers-all": (H, False, 30, 0, False, 8, 12, 8),
}


def inputs(case, dtype):
    G, colbias, window, slots, usage, T, S, chunk = NO_GRAD_CASES[case]
    torch.manual_seed(0)
    B, Dh = 2, 3
    top, rows = position_rows(S, T, chunk)

    def rand(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    tensors = [rand(B, H, T, Dh), rand(B, H, T, Dh), rand(B, H, S, Dh), rand(B, H, S, Dh), rand(G, rows, Dh)]
    tensors += [rand(H, rows) if colbias else None]
    tensors += [rand(B, H, slots, Dh), rand(B, H, slots, Dh)] if slots else [None, None]
    return tensors, dict(top=top, chunk=chunk, window=window, usage=usage)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)], ids=["float64", "float32"])
@pytest.mark.parametrize("case", list(NO_GRAD_CASES))
def test_no_grad_path_equals_the_autograd_path(case, dtype, tol):
    """Output and key usage of the no-grad call equal the autograd Function's (which training runs)."""
    (qc, qp, k, v, R, c, kp, vp), a = inputs(case, dtype)
    out, used = DistanceBiasAttention.apply(qc, qp, k, v, R, c, kp, vp, a["top"], a["window"],
                                            min(a["chunk"], distance_bias.QUERY_BLOCK), a["usage"], 0.0)  # fmt: skip
    assert out.requires_grad  # the training path, with its backward
    with torch.no_grad():
        fast, fast_used = distance_bias_attention(qc, qp, k, v, R, a["top"], a["chunk"], a["window"], c, kp, vp,
                                                  usage=a["usage"])  # fmt: skip
    torch.testing.assert_close(fast, out, rtol=tol, atol=tol)
    if a["usage"]:
        torch.testing.assert_close(fast_used, used, rtol=tol, atol=tol)
    else:
        assert fast_used is None


@pytest.mark.parametrize("case", ["memory", "clamp-len", "same-length", "persistent-same-length-clamp"])
@pytest.mark.parametrize("budget", [0, 2 * 1 * 20, 2 * 3 * 20], ids=["one-pass", "chunks-of-1", "chunks-of-3"])
def test_no_grad_relative_attention_is_the_papers_equation(case, budget):
    """Without gradient, relative attention (the position table reused, the no-grad path) is still Dai et al.'s
    equation, float64, called twice (the second call reads the reused table)."""
    from tests.test_distance_bias import RELATIVE_CASES

    options, T, S, window = RELATIVE_CASES[case]
    torch.manual_seed(0)
    ns = SimpleNamespace(pos_emb="relative", score_chunk_elements=budget, relative_route="explicit", **options)
    attn = build_attention("relative", D, H, 0.0, ns).double().eval()
    with torch.no_grad():
        attn.u.normal_()
        attn.v.normal_()
        q = torch.randn(2, H, T, D // H, dtype=torch.float64)
        k, v = (torch.randn(2, H, S, D // H, dtype=torch.float64) for _ in range(2))
        ref = relative_reference(attn, q, k, v, window)
        for _ in range(2):
            out, _ = attn.relative_attention(q, k, v, window=window)
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


class ProductShapes(TorchDispatchMode):
    """The output shapes of the matrix products run inside the block."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("bmm", "mm", "matmul", "baddbmm"):
            self.shapes.append(tuple(out.shape))
        return out


def test_no_grad_path_multiplies_only_the_keys_and_distances_a_chunk_sees():
    """Window 6, chunks of 4 queries over a memory: a chunk sees L = 6 + 4 - 1 = 9 keys and the distances 0 .. 5.
    No product is wider than the L keys; the position product is exactly the 6 distances wide. The training
    path (and the evaluation before the no-grad path) multiplied L + C - 1 = 12 columns of distances."""
    T, S, window, chunk = 8, 20, 6, 4
    qc, qp = torch.randn(2, H, T, 3), torch.randn(2, H, T, 3)
    k, v = torch.randn(2, H, S, 3), torch.randn(2, H, S, 3)
    top, rows = position_rows(S, T, chunk)
    R = torch.randn(H, rows, 3)
    with torch.no_grad(), ProductShapes() as seen:
        distance_bias_attention(qc, qp, k, v, R, top, chunk, window)
    widths = sorted({shape[-1] for shape in seen.shapes})
    assert widths == [3, window, window + chunk - 1], seen.shapes  # values (Dh), position, content


def relative_layer(**options):
    ns = SimpleNamespace(pos_emb="relative", relative_route="explicit", **options)
    attn = build_attention("relative", D, H, 0.0, ns).double().eval()
    with torch.no_grad():
        attn.u.normal_()
        attn.v.normal_()
    return attn


def test_position_keys_are_projected_once_per_shape_without_gradient():
    """Segments of one length over a full memory ask for the same S + C - 1 position keys every time: without
    gradient they are projected once (W_R's forward runs once), and the result is the same."""
    attn = relative_layer(same_length=True)
    calls = []
    attn.r_proj.register_forward_hook(lambda *_: calls.append(1))
    q, k, v = (torch.randn(1, H, n, D // H, dtype=torch.float64) for n in (8, 20, 20))
    with torch.no_grad():
        first, _ = attn.relative_attention(q, k, v, window=12)
        again, _ = attn.relative_attention(q, k, v, window=12)
        assert len(calls) == 1  # the second call reused the table
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        attn.relative_attention(q[:, :, :4], k[:, :, :16], v[:, :, :16], window=12)  # another shape: projected
        assert len(calls) == 2
        torch.testing.assert_close(first, relative_reference(attn, q, k, v, 12), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("how", ["data", "no_grad", "load_state_dict"])
def test_position_keys_follow_any_change_of_the_weights(how):
    """After W_R changes (an optimizer step through ``.data``, which the version counter does not see; an
    in-place update under no_grad; a loaded state dict), the next call uses the new W_R."""
    attn = relative_layer(same_length=True)
    q, k, v = (torch.randn(1, H, n, D // H, dtype=torch.float64) for n in (8, 20, 20))
    with torch.no_grad():
        attn.relative_attention(q, k, v, window=12)
        new_weight = torch.randn_like(attn.r_proj.weight)
        if how == "data":
            attn.r_proj.weight.data.copy_(new_weight)
        elif how == "no_grad":
            attn.r_proj.weight.mul_(0).add_(new_weight)
        else:
            attn.load_state_dict({**attn.state_dict(), "r_proj.weight": new_weight})
        out, _ = attn.relative_attention(q, k, v, window=12)
        torch.testing.assert_close(out, relative_reference(attn, q, k, v, 12), rtol=1e-12, atol=1e-12)


def test_position_keys_are_not_reused_with_gradient():
    """In training W_R gets its gradient through the position keys: they are computed at every call."""
    attn = relative_layer(same_length=True).train()
    calls = []
    attn.r_proj.register_forward_hook(lambda *_: calls.append(1))
    q, k, v = (torch.randn(1, H, n, D // H, dtype=torch.float64) for n in (8, 20, 20))
    with torch.no_grad():
        attn.relative_attention(q, k, v, window=12)
    out, _ = attn.relative_attention(q, k, v, window=12)
    out.sum().backward()
    assert len(calls) == 2 and attn.r_proj.weight.grad.abs().sum() > 0


MODEL_CASES = {  # name: (tokens_per_sample T, mem_len M, sequence L, options)
    "same-length": (6, 10, 31, dict(same_length=True)),
    "same-length-clamp-prenorm": (5, 8, 27, dict(same_length=True, clamp_len=4, decoder_normalize_before=True)),
    "memory": (6, 9, 25, dict()),
    "persistent-slots": (6, 8, 25, dict(same_length=True, persistent_mem_size=3)),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_segments_without_gradient_equal_segments_with_gradient(lm, case):
    """Whole model, segments with memory: under ``torch.no_grad`` (keys/values of the memory cached, position
    keys reused, the no-grad path) == with gradient enabled (everything recomputed, the autograd path), float64,
    and both == the one-pass reference with the recurrence's window (where it applies: no slots)."""
    T, M, L, opts = MODEL_CASES[case]
    model = xl_lm(lm, mem_len=M, score_chunk_elements=2 * 4 * (M + T), **opts).double().eval()
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.attn.u.normal_()
            layer.attn.v.normal_()
    toks = tokens(2, L)
    with torch.no_grad():
        fast = run_segments(model, toks, T)
        model.decoder.reset_memory()
        fast_again = run_segments(model, toks, T)  # the position tables are reused from the first pass
    model.decoder.reset_memory()
    slow = run_segments(model, toks, T)
    assert slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), **EXACT64)
    torch.testing.assert_close(fast_again, fast, rtol=0, atol=0)
    if "persistent_mem_size" not in opts:
        with torch.no_grad():
            window = recurrence_window(L, T, M, opts.get("same_length", False))
            torch.testing.assert_close(fast, reference_forward(model, toks, window), **EXACT64)
