"""One benchmark case per process, under a wall-time and an address-space cap.

The parent runs ``python -m recipes.benchmarks.suite.worker KIND SPEC_JSON``; the worker prints one
``RESULT {json}`` line. A timeout, a non-zero exit (OOM kill, crash, MemoryError under the cap) or a
missing result line becomes a row with ``status`` ``timeout`` / ``oom`` / ``error`` and the last line
of stderr, so the suite goes on.

Peak memory is measured inside the worker (``peak_mb``) by ``recipes.benchmarks.memory.peak_memory``
(one step after a warm-up step; on CPU the resident-set high-water mark, reset just before the step,
above the resident set before it; on CUDA ``max_memory_allocated`` above ``memory_allocated``). Workers
run with ``memory.MALLOC_ENV`` so that freed tensors leave the resident set (see ``memory``).
"""

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional

from ..memory import worker_env

REPO = Path(__file__).resolve().parents[3]
RESULT_PREFIX = "RESULT "


def _cap_address_space(gigabytes: Optional[float]) -> Optional[Callable[[], None]]:
    if not gigabytes:
        return None
    limit = int(gigabytes * 2**30)

    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def run_case(
    kind: str, spec: Dict, timeout: float, mem_cap_gb: Optional[float], env: Dict[str, str], isolate: bool = True
) -> Dict:
    """Run one case in a fresh interpreter; always return a row (``status`` ``ok`` or why not).
    ``isolate=False`` runs it in this process, without caps (``--smoke``: checks the logic, not the numbers)."""
    cmd = [sys.executable, "-m", "recipes.benchmarks.suite.worker", kind, json.dumps(spec)]
    start = time.time()
    row = {"kind": kind, **spec}
    if not isolate:
        from .worker import measure_case

        try:
            return {**row, "status": "ok", **measure_case(kind, spec), "wall_s": round(time.time() - start, 1)}
        except Exception as e:  # noqa: BLE001 (a failing case is a row, as in a subprocess)
            return {**row, "status": "error", "error": f"{type(e).__name__}: {e}"[:300]}
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=worker_env(env), cwd=REPO,
            preexec_fn=_cap_address_space(mem_cap_gb),
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {**row, "status": "timeout", "error": f"over {timeout:.0f} s", "wall_s": round(time.time() - start, 1)}
    row["wall_s"] = round(time.time() - start, 1)
    results = [line[len(RESULT_PREFIX) :] for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode == 0 and results:
        return {**row, "status": "ok", **json.loads(results[-1])}
    err = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
    return {**row, "status": failure_status(proc.returncode, proc.stderr), "error": err, "returncode": proc.returncode}


OUT_OF_MEMORY = ("MemoryError", "out of memory", "can't allocate memory", "Cannot allocate memory")


def failure_status(returncode: Optional[int], stderr: str) -> str:
    """``oom`` when the case was killed or its allocation refused (under the cap too), else ``error``."""
    return "oom" if returncode in (-9, 137) or any(m in stderr for m in OUT_OF_MEMORY) else "error"


def report(result: Dict) -> None:
    """Worker side: hand the measurement back to the parent."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)
