"""GPU mode: model FLOPs utilization (MFU) of bf16 training, against this device's measured bf16 matmul
rate (not a datasheet number).

MFU = achieved model FLOPs/s / measured peak FLOPs/s, with the model FLOPs of one training token
counted as 6 x (non-embedding parameters) + 6 x L x T x D for attention scores (Kaplan et al. 2020's
6N + attention approximation; causal masking not discounted, memory keys counted: T + M per query).
The code is device-generic so that the tests run it on a CPU at tiny sizes; the suite runs it on CUDA only.
"""

import time
from typing import Dict

import torch


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, n: int = 8192, repeats: int = 20) -> float:
    """FLOP/s of an n x n x n bf16 matrix product on ``device``: the measured peak MFU is relative to."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def training_mfu(spec: Dict) -> Dict:
    """One preset at its paper segment length: tokens/s of forward + backward + Adam under bf16 autocast."""
    from .generation import build_model

    model, _ = build_model({**spec, "tokens": spec["segment"], "options": spec["options"]})
    model.train()
    B, T = spec["batch"], spec["segment"]
    tokens = torch.randint(4, 260, (B, T), device=spec["device"])  # B x T, byte symbols
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    D, L = spec["D"], spec["L"]
    params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    keys = T + spec["options"].get("mem_len", 0)
    flops_per_token = 6 * params + 6 * L * keys * D

    position = [0]

    device = spec["device"]

    def step():  # consecutive segments of the same streams: the memory (if any) is used, as in training
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            logits, _ = model(tokens, stream_offset=position[0])
        position[0] += T
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), tokens.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(spec.get("warmup", 3)):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    synchronize(device)
    tokens_per_s = B * T * spec["steps"] / (time.perf_counter() - start)
    peak = matmul_peak(device, spec.get("matmul_n", 8192))
    return {"tokens_per_s": tokens_per_s, "model_tflops": tokens_per_s * flops_per_token / 1e12,
            "peak_tflops": peak / 1e12, "mfu": tokens_per_s * flops_per_token / peak}  # fmt: skip
