"""Half precision and non-finite values, for every registered attention (registry-driven).

bf16 autocast on CPU (what ``--autocast-bf16`` runs; fp16 needs CUDA, see ``tests/gpu/``) against
float32, same weights, on inputs of growing magnitude:

- ``|x| ~ 1`` and ``~ 10`` (LayerNorm keeps layer inputs near 1): relative error (Frobenius) below
  ``BF16_RTOL`` = 5e-2, with memory over two segments where the mechanism supports it. bf16 keeps 8
  mantissa bits (relative rounding 2^-9 = 2e-3 per value); the error measured here is 0.4% at 1
  and 1.6-2.4% at 10, because rounded attention scores move the softmax weights.
- ``|x|`` up to 1e4: the output stays finite (no overflow to inf, no NaN from inf - inf in the
  softmax). The error there is not bounded by a tolerance: scores of ~1e6 rounded to bf16 change the
  softmax itself; only float32 attention math would preserve it.
- The whole model under ``--autocast-bf16`` with embeddings scaled x100: finite loss and gradients,
  logits within ``BF16_RTOL`` of float32, and the logits (the output projection) stay float32.

An auxiliary loss that becomes inf or NaN stops training with its name (``aux_cross_entropy``);
fairseq itself sees only the total.
"""

from types import SimpleNamespace

import pytest
import torch

from plugins.attention import ATTENTION_REGISTRY, AuxLoss, build_attention

NAMES = sorted(ATTENTION_REGISTRY)
BF16_RTOL = 5e-2
B, T, D, H = 2, 16, 32, 4


def positions_for(name: str) -> str:
    cls = ATTENTION_REGISTRY[name].cls
    return cls.encodes_positions[0] if cls.requires_own_positions else "none"


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def two_segments(attn, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    keep = T if attn.supports_memory else 0
    outs, mem = [], None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for segment in x.split(T, dim=1):
            out, mem = attn(segment, mem, keep=keep)
            outs.append(out.float())
    return torch.cat(outs, dim=1)


def bf16_error(name: str, scale: float) -> torch.Tensor:
    """bf16-autocast output of attention ``name`` and its relative error to float32 (inputs ~ ``scale``)."""
    torch.manual_seed(0)
    attn = build_attention(name, D, H, 0.0, SimpleNamespace(pos_emb=positions_for(name))).eval()
    x = torch.randn(B, 2 * T, D) * scale
    reference, half = two_segments(attn, x, bf16=False), two_segments(attn, x, bf16=True)
    return half, rel_error(half, reference)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_bf16_autocast_matches_float32(name, scale):
    half, error = bf16_error(name, scale)
    assert torch.isfinite(half).all()
    assert error < BF16_RTOL, error


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_stays_finite_on_huge_inputs(name):
    torch.manual_seed(0)
    attn = build_attention(name, D, H, 0.0, SimpleNamespace(pos_emb=positions_for(name))).eval()
    for scale in (1e2, 1e3, 1e4):
        x = torch.randn(B, 2 * T, D) * scale
        assert torch.isfinite(two_segments(attn, x, bf16=True)).all(), scale


@pytest.mark.parametrize("name", NAMES)
def test_whole_model_under_autocast_bf16_with_large_embeddings(lm, name):
    pos = positions_for(name)
    mem = 8 if ATTENTION_REGISTRY[name].cls.supports_memory and pos not in ("sinusoidal", "learned") else 0
    models = [lm(attention=name, pos_emb=pos, mem_len=mem, autocast_bf16=bf16, decoder_normalize_before=True)
              for bf16 in (False, True)]  # fmt: skip
    models[1].load_state_dict(models[0].state_dict())
    tokens = torch.randint(4, 24, (B, T))
    logits = []
    for model in models:
        with torch.no_grad():
            model.decoder.embed_tokens.weight.mul_(100.0)
        out, _ = model(tokens, stream_offset=0)
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.size(-1)), tokens.reshape(-1))
        loss.backward()
        assert torch.isfinite(loss) and all(
            torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
        )
        logits.append(out.detach())
    assert logits[1].dtype == torch.float32
    assert rel_error(logits[1], logits[0]) < BF16_RTOL, rel_error(logits[1], logits[0])


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_auxiliary_loss_is_reported_with_its_name(lm, dictionary, task_stub, bad):
    """A mechanism's aux term (here layer 0's attention returns one; the decoder sums it over layers and
    the criterion adds it) that is not finite stops the step with a message naming it."""
    from plugins.criterions.aux_cross_entropy import AuxCrossEntropyCriterion

    model = lm(attention="full", pos_emb="none")
    finite = AuxLoss(torch.tensor(0.5), 0.1)
    model.decoder.layers[0].attn.aux_losses = lambda mem: {"span": AuxLoss(torch.tensor(bad), 0.1), "ok": finite}
    criterion = AuxCrossEntropyCriterion(task_stub(dictionary), sentence_avg=False)
    tokens = torch.randint(4, len(dictionary), (B, T + 1))
    sample = {"net_input": {"src_tokens": tokens[:, :-1]}, "target": tokens[:, 1:], "ntokens": B * T}
    with pytest.raises(FloatingPointError, match=r"auxiliary loss 'span' = (inf|nan) .* not finite"):
        criterion(model, sample)
    model.decoder.layers[0].attn.aux_losses = lambda mem: {"ok": finite}  # finite: logged, no error
    _, _, log = criterion(model, sample)
    assert torch.isclose(log["aux_ok"], torch.tensor(0.5 * B * T))  # value x sample_size, one layer reports it


if __name__ == "__main__":  # the measured errors, for README: python tests/test_numerics.py
    print("| attention | bf16 vs float32, inputs ~1 | inputs ~10 |\n|---|---:|---:|")
    for name in NAMES:
        print(f"| {name} | " + " | ".join(f"{100 * bf16_error(name, s)[1]:.2f}%" for s in (1.0, 10.0)) + " |")
