"""Peak memory of one step, measured the same way by every benchmark.

``peak_memory(step, device) -> (bytes, exact)`` runs ``step()`` once and returns the memory it added at
its peak above what was held just before the call:

- CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` before the call, after
  ``torch.cuda.reset_peak_memory_stats()``: bytes of live tensors handed out by torch's caching allocator.
  Not counted: the allocator's cached-but-free blocks, fragmentation, cuBLAS/cuDNN workspaces, the CUDA
  context. Always exact.
- CPU: ``VmHWM - VmRSS`` (``/proc/self/status``), where ``VmRSS`` is read just before the call and the
  high-water mark ``VmHWM`` is reset to the current resident set by writing ``5`` to
  ``/proc/self/clear_refs`` (Linux >= 4.0). Counted: every page the process touches during the step and
  that is resident at its peak: activations, temporaries, new gradients, kernels' scratch space, Python
  objects. Not counted: whatever was resident before the step (weights, inputs, existing gradients and
  caches, the interpreter and torch), memory a step allocates but never touches, and memory the step gets
  back from the allocator's free lists (already resident). The last point is why a worker must run with
  ``MALLOC_ENV`` (``worker_env``): with a fixed mmap threshold glibc maps every block of 64 KiB or more
  separately and unmaps it when freed, so the resident set follows the live tensors instead of the heap's
  high-water mark. The allocations of a first call (thread pools, kernel selection, lazily built
  buffers) are counted unless the caller runs a warm-up step first; that is the caller's choice.
  When ``clear_refs`` is not writable the high-water mark cannot be reset: the result is then
  ``VmHWM`` after the call minus ``VmRSS`` before, exact only if the step raised the process's
  high-water mark and an upper bound of the step's peak otherwise (``exact`` False).

``saved_tensor_bytes(fn, *args)`` / ``count_saved_tensors()``: bytes autograd keeps for the backward pass
(``torch.autograd.graph.saved_tensors_hooks``): each saved tensor's whole storage, every storage once,
weights and inputs included when they are saved. Exact and independent of the device and the allocator:
the activation memory a model pays per layer in training, without temporaries.
"""

import contextlib
import functools
import gc
import os
import sys
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

import torch

# glibc: blocks >= 64 KiB get their own mapping, returned to the OS on free (and the threshold stays fixed).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
CLEAR_REFS = "/proc/self/clear_refs"


def worker_env(env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """``env`` (default: this process's) with ``MALLOC_ENV`` set: the environment of a measuring worker.
    Says once on stderr when this machine cannot reset the peak (CPU peaks are then upper bounds)."""
    _check_reset_once()
    return {**(os.environ if env is None else env), **MALLOC_ENV}


def peak_memory(step: Callable[[], object], device: Union[str, torch.device] = "cpu") -> Tuple[int, bool]:
    """Run ``step()`` once; return (bytes it added at its peak above what was held before it, exact)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return max(torch.cuda.max_memory_allocated() - before, 0), True
    gc.collect()  # garbage from earlier steps would otherwise be freed (or not) during this one
    high_before, before = _status_bytes("VmHWM"), _status_bytes("VmRSS")
    reset = _reset_peak()
    step()
    high = _status_bytes("VmHWM")
    return max(high - before, 0), reset or high > high_before


@contextlib.contextmanager
def count_saved_tensors() -> Iterator[Dict[str, int]]:
    """``with count_saved_tensors() as saved: <forward>``; then ``saved["bytes"]``: the bytes of the
    storages autograd saved for backward inside the block (each storage once)."""
    storages: Dict[int, torch.UntypedStorage] = {}  # kept alive in the block, so no address is reused

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage
        return t

    saved = {"bytes": 0}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved
    saved["bytes"] = sum(s.nbytes() for s in storages.values())


def saved_tensor_bytes(fn: Callable, *args, **kwargs) -> int:
    """Bytes autograd saves for backward while ``fn(*args, **kwargs)`` runs (see ``count_saved_tensors``)."""
    with count_saved_tensors() as saved:
        fn(*args, **kwargs)
    return saved["bytes"]


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status (the CPU peak needs Linux)")


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident set; False when this machine does not allow it."""
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@functools.cache
def _check_reset_once() -> bool:
    if _reset_peak():
        return True
    print(f"note: {CLEAR_REFS} is not writable here: CPU peak memory is an upper bound", file=sys.stderr)
    return False
