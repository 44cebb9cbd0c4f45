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


def test_quality_presets_are_sized_to_full_tiny():
    """Every ``*_tiny`` preset the quality section trains ends within 10% of ``full_tiny``'s parameters on a
    character vocabulary (all-attention by its persistent slots, the others by their feed-forward width)."""
    from conftest import make_dictionary

    from recipes.benchmarks.suite import quality

    dictionary, segment = make_dictionary(50), 64
    target, _ = quality.parameter_count(quality.REFERENCE, dictionary, {}, segment)
    resized = {}
    for preset in quality.tiny_presets():
        sized = quality.sized_overrides(preset, dictionary, target, segment)
        params, _ = quality.parameter_count(preset, dictionary, sized, segment)
        assert abs(params / target - 1) <= 0.10, (preset, sized, params, target)
        if sized:
            resized[preset] = sized
    assert resized["all_attention_tiny"].keys() == {"persistent_mem_size"}
    assert resized["compressive_tiny"]["decoder_ffn_embed_dim"] < 256  # its compression convs cost parameters
