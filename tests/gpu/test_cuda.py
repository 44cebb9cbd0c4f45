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
