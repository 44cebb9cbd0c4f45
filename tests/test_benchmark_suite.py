"""The benchmark suite's own logic (``python -m recipes.benchmarks.run --smoke``): every registered
attention produces a layer row, the generation cases run through fairseq's generator, every mechanism case
runs, the training section times real ``fairseq-train`` runs, the figures and the summary are written.
Speed itself is never asserted."""

import json

import pytest
import torch

from plugins.attention import ATTENTION_REGISTRY
from recipes.benchmarks import memory, run
from recipes.benchmarks.suite import layer, mechanisms


def test_smoke_run_covers_every_registered_attention(tmp_path):
    run_dir = run.main(["--smoke", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    ours = [r for r in rows if r["section"] == "layer" and not r.get("peer")]
    expected = {name for name in ATTENTION_REGISTRY if layer.VARIANTS.get(name, [("", {})])}
    assert {r["attention"] for r in ours} == expected
    variants = {(name, label) for name in expected for label, _ in layer.VARIANTS.get(name, [("", {})])}
    assert {(r["attention"], r["label"]) for r in ours} == variants  # every variant has its rows
    failed = [(r["attention"], r["label"], r.get("error")) for r in ours if r["status"] != "ok"]
    assert not failed, failed
    assert all(r["time_ms"] > 0 and r["peak_mb"] >= 0 for r in ours)
    generation = [r for r in rows if r["section"] == "generation"]
    assert generation and all(r["status"] == "ok" for r in generation), generation
    assert all(r["generated"] == r["tokens"] + 1 for r in generation)  # </s> + exactly `tokens` new ones
    mechanism_rows = [r for r in rows if r["section"] == "mechanisms"]
    assert {r["case"] for r in mechanism_rows} == set(mechanisms.CASES)
    assert all(r["status"] == "ok" for r in mechanism_rows), [r for r in mechanism_rows if r["status"] != "ok"]
    span = {(r["setting"], r["kind"]): r for r in mechanism_rows if r["case"] == "span"}
    assert span["short", "eval"]["window"] < span["full", "eval"]["window"] == span["full", "eval"]["max_span"]
    compressive = next(r for r in mechanism_rows if r["case"] == "compressive")["models"]
    assert compressive["compressive"]["keys"] == compressive["xl_same_keys"]["keys"] < compressive["xl"]["keys"]
    for png in ("layer_scaling.png", "generation.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (run_dir / "summary.md").read_text()
    assert "## One attention layer" in summary and "## Goals" in summary and "### Adaptive span" in summary

    (run_dir / "summary.md").unlink()  # --summarize rebuilds the report from results.jsonl alone
    assert run.main(["--summarize", str(run_dir)]) == run_dir
    assert (run_dir / "summary.md").read_text().split("\n", 3)[3] == summary.split("\n", 3)[3]  # all but the time


def test_quick_is_bounded_and_runs_every_section():
    """``--quick`` (issue 18: under 20 minutes on 2 cores) runs every section, the quality section on PTB
    characters only with the test split cut to a prefix; the full run keeps both datasets and whole test splits,
    and the flags override either."""
    quick = run.parse_args(["--quick"])
    assert quick.only == list(run.SECTIONS) and {"mechanisms", "training", "evaluation"} <= set(quick.only)
    assert quick.quality_data == ["ptb-chars"] and 0 < quick.quality_test_tokens <= 32768
    assert max(quick.lengths) <= 4096 and quick.evaluation["contexts"] == [256, 800]
    full = run.parse_args([])
    assert full.quality_data == ["ptb-chars", "wikitext-2"] and full.quality_test_tokens == 0
    assert full.quality_updates == 3000 and max(full.lengths) == 16384
    again = run.parse_args(["--quick", "--quality-data", "ptb-chars,wikitext-2", "--quality-test-tokens", "0",
                            "--contexts", "1600", "--training-cases", "xl"])  # fmt: skip
    assert again.quality_data == ["ptb-chars", "wikitext-2"] and again.quality_test_tokens == 0
    assert again.evaluation["contexts"] == [1600] and again.training_cases == ["xl"]
    for bad in (["--only", "layer,nope"], ["--quality-test-tokens", "-1"], ["--mechanism-cases", "span,nope"]):
        with pytest.raises(SystemExit):
            run.parse_args(bad)


def test_training_repeats_replace_the_levels_repeats():
    """``--training-repeats N``: N interleaved repeats of every training configuration at any level (a single
    --quick repeat of the fairseq case spread 0.98-1.24x on a loaded machine); bad values stop at parsing."""
    from recipes.benchmarks.suite import training

    assert run.parse_args(["--quick"]).training_repeats is None
    assert run.parse_args(["--quick", "--only", "training", "--training-repeats", "5"]).training_repeats == 5
    assert [training.sizes(case, 1)["repeats"] for case in training.CASES] == [1, 1, 1]
    assert [training.sizes(case, 1, 5)["repeats"] for case in training.CASES] == [5, 5, 5]
    assert training.sizes("fairseq", 0, 5) == {**training.sizes("fairseq", 0), "repeats": 5}
    for bad in ("0", "-2", "two", "2,3"):
        with pytest.raises(SystemExit):
            run.parse_args(["--training-repeats", bad])


def test_quality_test_prefix_is_the_start_of_the_test_split(tmp_path):
    """``--quality-test-tokens N`` scores the split ``test_first<N>``: the first N tokens of ``test``, in order,
    readable by ``segment_lm`` as ``test`` is."""
    from fairseq import options
    from fairseq.data import Dictionary, data_utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.tasks import TASK_REGISTRY

    from recipes.benchmarks.suite import quality, training

    data = training.binarize({"train": ["a b c"] * 4, "valid": ["a b"], "test": [f"line {i} of the test text"
                              for i in range(40)]}, tmp_path)  # fmt: skip
    assert quality.test_prefix(data, 0) == "test"
    split = quality.test_prefix(data, 300)
    assert split == "test_first300" and quality.test_split(300) == split
    dictionary = Dictionary.load(str(data / "dict.txt"))
    whole = torch.cat([t for t in data_utils.load_indexed_dataset(str(data / "test"), dictionary)])
    prefix = torch.cat([t for t in data_utils.load_indexed_dataset(str(data / split), dictionary)])
    assert prefix.numel() == 300 and torch.equal(prefix, whole[:300])
    argv = [str(data), "--task", "segment_lm", "--arch", "full_tiny", "--tokens-per-sample", "16", "--cpu"]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    task = TASK_REGISTRY["segment_lm"].setup_task(cfg.task)
    task.load_dataset(split)
    assert len(task.dataset(split)) > 0


def test_training_section_times_real_fairseq_train_runs(tmp_path):
    """``--only training --training-cases fairseq`` at smoke sizes: ours and fairseq's transformer_lm, each a
    real ``fairseq-train``, with the same parameter count and a ratio to the reference."""
    run_dir = run.main(["--smoke", "--only", "training", "--training-cases", "fairseq", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == ["efficient_lm --attention full (ours)", "fairseq transformer_lm"]
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows), rows
    ours, theirs = rows
    assert ours["params"] == theirs["params"] and theirs["vs_reference"] == 1.0 and ours["vs_reference"] > 0
    assert "## Training tokens/s" in (run_dir / "summary.md").read_text()


def test_training_section_linear_case_pairs_linear_tiny_with_full_tiny(tmp_path):
    """``--training-cases linear`` (smoke sizes): linear_tiny against full_tiny, both real ``fairseq-train``
    runs at the same segment length and size, full_tiny the reference."""
    run_dir = run.main(["--smoke", "--only", "training", "--training-cases", "linear", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert [(r["model"], r["status"]) for r in rows] == [("full_tiny", "ok"), ("linear_tiny", "ok")], rows
    full, linear = rows
    assert full["segment"] == linear["segment"] and full["params"] == linear["params"]
    assert full["vs_reference"] == 1.0 and linear["vs_reference"] > 0 and "--arch linear_tiny" in linear["command"]


def test_a_refused_allocation_is_an_oom_row():
    from recipes.benchmarks.suite.isolate import failure_status

    refused = "RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate 4294967296 bytes."
    assert failure_status(1, refused) == "oom" and failure_status(-9, "") == "oom"
    assert failure_status(1, "ValueError: bad option") == "error"


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


def test_cpu_peak_memory_sees_a_known_allocation():
    """``memory.peak_memory`` on CPU: a step that allocates and touches 64 MiB reports about 64 MiB (the
    high-water mark is reset before it, so the test process's earlier peaks do not hide it); a step that
    allocates nothing reports almost nothing."""
    mib = 2**20
    peak, exact = memory.peak_memory(lambda: torch.ones(16 * mib).sum(), "cpu")  # 16 Mi float32, written
    if not exact:
        pytest.skip("/proc/self/clear_refs is not writable here: the peak cannot be reset")
    assert 60 * mib <= peak < 100 * mib, peak / mib
    idle, exact = memory.peak_memory(lambda: None, "cpu")
    assert exact and idle < 8 * mib, idle / mib


def test_saved_tensor_bytes_counts_each_saved_storage_once():
    x, w = torch.randn(100, 64), torch.randn(64, 64, requires_grad=True)
    # x @ w saves x (for w's gradient; x needs none), relu its output: two 100 x 64 storages
    assert memory.saved_tensor_bytes(lambda: (x @ w).relu().sum()) == 2 * x.nbytes
    # each x @ w saves the same x (counted once), the product saves both factors
    assert memory.saved_tensor_bytes(lambda: (x @ w * (x @ w)).sum()) == 3 * x.nbytes


def test_gpu_mfu_case_runs_its_training_steps_at_tiny_sizes_on_cpu():
    """The GPU section's code path (bf16 autocast, Adam, memory over consecutive segments, MFU arithmetic),
    device-generic, at tiny sizes: what CUDA runs, minus the device."""
    from recipes.benchmarks.suite import gpu

    for options in ({"pos_emb": "sinusoidal"}, {"pos_emb": "relative", "mem_len": 16}):
        attention = "relative" if "mem_len" in options else "full"
        spec = {"attention": attention, "label": attention, "options": options, "L": 2, "D": 32, "H": 2,
                "segment": 16, "batch": 2, "steps": 2, "warmup": 1, "matmul_n": 64, "device": "cpu"}  # fmt: skip
        result = gpu.training_mfu(spec)
        assert result["tokens_per_s"] > 0 and 0 < result["mfu"] < 10, result


def test_memory_variants_attend_the_last_half_over_all_keys_against_sdpa_with_the_same_memory():
    """Issue 18's "T = M = N/2 with memory": the memory variants' forward takes the first N/2 positions as a
    detached memory and returns the last N/2 (no gradient into the memory), and their SDPA reference is ``full``
    with the same memory at the same N, not ``full`` without memory."""
    torch.manual_seed(0)
    specs = [c for c in layer.cases([64], 32, 2, "cpu") if layer.MEMORY_LABEL in c["label"]]
    assert {c["attention"] for c in specs} == {"full", "relative", "compressive", "adaptive_span"}
    for spec in specs:
        name = spec["attention"]
        assert spec["options"][layer.MEMORY_OPTION] == 32
        x = torch.randn(1, 64, 32, requires_grad=True)
        out = layer.build_ours(spec)(x)
        assert out.shape == (1, 32, 32), name
        out.square().sum().backward()
        assert (x.grad[:, :32] == 0).all() and (x.grad[:, 32:] != 0).any(), name
    rows = [dict(status="ok", attention="full", label="", N=64, time_ms=10.0, peak_mb=1.0),
            dict(status="ok", attention="full", label=layer.MEMORY_LABEL, N=64, time_ms=20.0, peak_mb=2.0),
            dict(status="ok", attention="relative", label=layer.MEMORY_LABEL, N=64, time_ms=30.0, peak_mb=3.0),
            dict(status="ok", attention="relative", label="", N=64, time_ms=30.0, peak_mb=3.0)]  # fmt: skip
    layer.add_ratios(rows)
    assert rows[2]["time_vs_sdpa"] == 1.5 and rows[2]["mem_vs_sdpa"] == 1.5
    assert rows[3]["time_vs_sdpa"] == 3.0
