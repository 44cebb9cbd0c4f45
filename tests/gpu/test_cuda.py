"""GPU-only checks: skipped where CUDA is not available (CI has no GPU)."""

import pytest
import torch

from tests.test_transformer_xl import FP32, _saved, tokens, xl_lm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def test_memory_restored_from_a_cpu_checkpoint_runs_on_the_gpu(lm):
    """fairseq loads checkpoints on the CPU into a model already on the GPU (trainer.load_checkpoint)."""
    model = xl_lm(lm, mem_len=6).train()
    seg1, seg2 = tokens(2, 5), tokens(2, 4)
    model(seg1, stream_offset=0)
    state = _saved(model)
    expected, _ = model(seg2, stream_offset=5)
    gpu = xl_lm(lm, mem_len=6, seed=1).cuda().train()
    gpu.load_state_dict(state)
    out, _ = gpu(seg2.cuda(), stream_offset=5)
    torch.testing.assert_close(out.cpu(), expected, **FP32)


@pytest.mark.parametrize("case", ["no-memory", "memory", "same-length", "persistent"])
def test_fused_relative_attention_on_the_gpu_is_the_explicit_path(case):
    """``--relative-route fused`` on CUDA (memory: ``causal_lower_right``): the same
    outputs and gradients as the explicit route, float64 (tests/test_relative_sinusoid.py has the CPU cases)."""
    from tests.test_relative_sinusoid import RELATIVE_CASES, TOLERANCE, pair, run, segments

    options, lengths, keep, D, H, budget = RELATIVE_CASES[case]
    explicit, fused = pair("relative", torch.float64, D=D, H=H, budget=budget, **options)
    explicit, fused = explicit.cuda(), fused.cuda()
    xs = [x.detach().cuda().requires_grad_() for x in segments(lengths, torch.float64, D=D)]
    a, b = run(explicit, xs, keep), run(fused, xs, keep)
    for x, y in zip(a[0] + a[3], b[0] + b[3]):
        torch.testing.assert_close(y, x, **TOLERANCE[torch.float64])
