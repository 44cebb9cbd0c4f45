"""The benchmark suite's own logic (``python -m recipes.benchmarks.run --smoke``): every registered
attention produces a layer row, the generation cases run through fairseq's generator, the figures and the
summary are written. Speed itself is never asserted."""

import json

from plugins.attention import ATTENTION_REGISTRY
from recipes.benchmarks import run
from recipes.benchmarks.suite import layer


def test_smoke_run_covers_every_registered_attention(tmp_path):
    run_dir = run.main(["--smoke", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    ours = [r for r in rows if r["section"] == "layer" and not r.get("peer")]
    expected = {name for name in ATTENTION_REGISTRY if layer.VARIANTS.get(name, [("", {})])}
    assert {r["attention"] for r in ours} == expected
    failed = [(r["attention"], r["label"], r.get("error")) for r in ours if r["status"] != "ok"]
    assert not failed, failed
    assert all(r["time_ms"] > 0 and r["peak_mb"] >= 0 for r in ours)
    generation = [r for r in rows if r["section"] == "generation"]
    assert generation and all(r["status"] == "ok" for r in generation), generation
    assert all(r["generated"] == r["tokens"] + 1 for r in generation)  # </s> + exactly `tokens` new ones
    for png in ("layer_scaling.png", "generation.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (run_dir / "summary.md").read_text()
    assert "## One attention layer" in summary and "## Goals" in summary
