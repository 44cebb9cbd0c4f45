"""``segment_lm``: contiguous streams of segments (``SegmentStreamDataset``) and the task around them.

The dataset is checked on synthetic token arrays whose values are all distinct (token = position + 10),
so "every token is a target exactly once" and "rows are contiguous slices" are exact comparisons. The
task is built the real way: ``SegmentLMTask.setup_task`` on a directory binarized by fairseq-preprocess
(byte-decimal text and a 256-symbol byte dictionary, as preprocess/ writes them).

Shapes: B = streams per rank, T = segment length (--tokens-per-sample), N = tokens in the split.
"""

import copy
import functools
import json
import shutil

import numpy as np
import pytest
import torch
from fairseq import options
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq_cli import preprocess

from plugins.errors import UserError
from plugins.tasks.segment_lm import SegmentLMTask, guess_token_unit
from plugins.tasks.stream_dataset import SegmentStreamDataset, flat_tokens

PAD, EOS = 1, 2
LAYOUTS = [  # (N, streams per rank, world size, T)
    (96, 4, 1, 8),  # everything divides
    (101, 4, 1, 8),  # N % streams != 0 and stream length % T != 0
    (37, 3, 1, 5),
    (37, 3, 2, 4),  # two ranks
    (50, 2, 3, 7),  # three ranks, N % (streams x ranks) != 0
    (10, 10, 1, 3),  # one token per stream
    (7, 2, 2, 10),  # T longer than any stream
    (50, 1, 1, 7),  # one stream: plain sequential evaluation
]


def synthetic_tokens(n: int) -> np.ndarray:
    return (np.arange(n) + 10).astype(np.uint16)  # distinct, never pad/eos; uint16 like a .bin memmap


def datasets(n, streams, world_size, T, tokens=None):
    tokens = synthetic_tokens(n) if tokens is None else tokens
    return [SegmentStreamDataset(tokens, EOS, PAD, T, streams, world_size, rank) for rank in range(world_size)]


def rows(ds: SegmentStreamDataset):
    """Per stream of this rank: (inputs, targets) concatenated over batches, checking the padding."""
    inputs = [[] for _ in range(ds.streams_per_rank)]
    targets = [[] for _ in range(ds.streams_per_rank)]
    for i in range(len(ds)):
        batch = ds[i]
        src, tgt, lengths = batch["net_input"]["src_tokens"], batch["target"], batch["net_input"]["src_lengths"]
        assert src.shape == tgt.shape and src.size(0) == ds.streams_per_rank and src.size(1) <= ds.segment_len
        assert src.size(1) == max(int(lengths.max()), 1)  # no all-pad column
        assert batch["ntokens"] == int(lengths.sum()) == int((tgt != PAD).sum()) > 0
        assert batch["nsentences"] == ds.streams_per_rank
        for b, n in enumerate(lengths.tolist()):
            assert torch.all(src[b, n:] == PAD) and torch.all(tgt[b, n:] == PAD), "padding only at row ends"
            assert torch.all(tgt[b, :n] != PAD) and torch.all(src[b, :n] != PAD)
            inputs[b].append(src[b, :n].numpy())
            targets[b].append(tgt[b, :n].numpy())
    return [np.concatenate(r) for r in inputs], [np.concatenate(r) for r in targets]


# ---- the dataset ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, streams, world_size, T", LAYOUTS)
def test_every_token_is_a_target_exactly_once(n, streams, world_size, T):
    tokens = synthetic_tokens(n)
    all_targets = []
    for ds in datasets(n, streams, world_size, T):
        _, targets = rows(ds)
        all_targets += targets
    # streams in order (rank-major, then row) tile the split: no gap, no overlap, no reordering
    assert np.array_equal(np.concatenate(all_targets), tokens)
    assert sum(ds.num_targets for ds in datasets(n, streams, world_size, T)) == n


@pytest.mark.parametrize("n, streams, world_size, T", LAYOUTS)
def test_rows_are_contiguous_streams(n, streams, world_size, T):
    tokens = synthetic_tokens(n)
    position = 0
    for ds in datasets(n, streams, world_size, T):
        inputs, targets = rows(ds)
        for inp, tgt in zip(inputs, targets):
            assert np.array_equal(tgt, tokens[position : position + len(tgt)])
            previous = EOS if position == 0 else tokens[position - 1]  # the prepended eos starts the split
            assert np.array_equal(inp, np.concatenate([[previous], tgt[:-1]]))  # input = target shifted by one
            position += len(tgt)
        lengths = [len(t) for t in targets]
        assert max(lengths) - min(lengths) <= 1  # nearly equal streams


@pytest.mark.parametrize("n, streams, world_size, T", LAYOUTS)
def test_next_segment_starts_with_the_last_target(n, streams, world_size, T):
    for ds in datasets(n, streams, world_size, T):
        for i in range(len(ds) - 1):
            now, nxt = ds[i], ds[i + 1]
            for b in range(ds.streams_per_rank):
                n_now, n_next = int(now["net_input"]["src_lengths"][b]), int(nxt["net_input"]["src_lengths"][b])
                if n_next:
                    assert n_now == T  # only a stream's last segment is short
                    assert nxt["net_input"]["src_tokens"][b, 0] == now["target"][b, n_now - 1]


def test_first_input_is_the_prepended_eos():
    ds = datasets(20, 2, 1, 4)[0]
    assert ds[0]["net_input"]["src_tokens"][0, 0] == EOS
    assert ds[0]["net_input"]["src_tokens"][1, 0] == 10 + 9  # stream 2 continues from stream 1's last target
    assert ds[0]["target"][0, 0] == 10


@pytest.mark.parametrize("n, streams, T", [(37, 3, 4), (50, 2, 7), (9, 2, 3)])
def test_ranks_partition_the_streams(n, streams, T):
    """World size 2 with B streams each == world size 1 with 2B streams, split between the ranks."""
    single = datasets(n, 2 * streams, 1, T)[0]
    ranks = datasets(n, streams, 2, T)
    assert len(ranks[0]) == len(ranks[1]) == len(single)  # every rank runs the same number of steps (DDP)
    for i in range(len(single)):
        whole = single[i]
        for rank, ds in enumerate(ranks):
            part = ds[i]
            lengths = part["net_input"]["src_lengths"]
            assert torch.equal(lengths, whole["net_input"]["src_lengths"][rank * streams : (rank + 1) * streams])
            for b, n_b in enumerate(lengths.tolist()):
                row = rank * streams + b
                for key in ("src_tokens", "target"):
                    got = part["net_input"][key] if key == "src_tokens" else part[key]
                    want = whole["net_input"][key] if key == "src_tokens" else whole[key]
                    assert torch.equal(got[b, :n_b], want[row, :n_b])


def test_with_streams_relayouts_the_same_split():
    ds = datasets(37, 3, 1, 4)[0]
    other = ds.with_streams(5)
    assert other.streams_per_rank == 5 and other.segment_len == 4 and other.tokens is ds.tokens
    assert ds.streams_per_rank == 3  # the original is untouched
    _, targets = rows(other)
    assert len(targets) == 5
    assert np.array_equal(np.concatenate(targets), synthetic_tokens(37))


def test_too_few_tokens_for_the_streams_is_a_user_error():
    with pytest.raises(UserError, match="--batch-size"):
        SegmentStreamDataset(synthetic_tokens(5), EOS, PAD, 4, streams_per_rank=3, world_size=2, rank=0)


def test_sizes_and_order():
    ds = datasets(37, 3, 1, 4)[0]
    assert len(ds) == 4  # streams of 13, 12, 12 targets: ceil(13 / 4)
    assert np.array_equal(ds.ordered_indices(), np.arange(4))
    assert np.array_equal(ds.sizes, np.full(4, 4)) and ds.num_tokens(0) == 12 and ds.size(0) == 4
    assert torch.equal(ds.collater([ds[2]])["target"], ds[2]["target"])
    assert torch.equal(ds[1]["id"], torch.arange(3) + 3)


# ---- the task on a binarized directory -----------------------------------------------------------------
LINES = {
    "train": ["hello world", "segment lm streams", "abc", "the quick brown fox jumps over the lazy dog"],
    "valid": ["valid line one", "two"],
}


def encode(lines, dictionary):
    """What fairseq-preprocess writes: byte values as symbols, </s> after every line."""
    ids = []
    for line in lines:
        ids += [dictionary.index(str(b)) for b in line.encode()] + [dictionary.eos()]
    return np.array(ids)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("segment_lm")
    (root / "bytes.dict").write_text("".join(f"{i} 1\n" for i in range(256)))
    for split, lines in LINES.items():
        (root / f"{split}.txt").write_text("".join(" ".join(str(b) for b in line.encode()) + "\n" for line in lines))
    args = options.get_preprocessing_parser().parse_args(
        ["--only-source", "--srcdict", str(root / "bytes.dict"), "--trainpref", str(root / "train.txt"),
         "--validpref", str(root / "valid.txt"), "--destdir", str(root / "bin"), "--workers", "1"]
    )  # fmt: skip
    log = preprocess.logger
    handlers = list(log.handlers)
    preprocess.main(args)
    for handler in log.handlers[len(handlers) :]:  # preprocess adds a FileHandler per call
        log.removeHandler(handler)
        handler.close()
    return root / "bin"


def task_config(data, *flags):
    """``cfg.task`` exactly as ``fairseq-train DATA --task segment_lm FLAGS`` builds it (argparse, then
    the hydra config, whose II fields are resolved from ``dataset``)."""
    argv = [str(data), "--task", "segment_lm", "--arch", "full_tiny", "--tokens-per-sample", "8", "--cpu", *flags]
    return convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv)).task


@functools.cache
def _base_task_config():
    return task_config("DATA", "--batch-size", "2")


def setup_task(data, **task_fields):
    """``SegmentLMTask.setup_task`` on ``--batch-size 2`` with fields of ``cfg.task`` replaced (building
    the hydra config takes ~0.6 s, so it is built once and copied)."""
    cfg = copy.deepcopy(_base_task_config())
    cfg.data = str(data)
    for name, value in task_fields.items():
        setattr(cfg, name, value)
    return SegmentLMTask.setup_task(cfg)


def test_task_from_the_hydra_config(data_dir):
    """fairseq-train passes ``cfg.task`` (its II fields resolved from ``dataset``): streams come from it."""
    task = SegmentLMTask.setup_task(task_config(data_dir, "--max-tokens", "24", "--batch-size-valid", "2"))
    assert task.streams_per_rank("train") == 3  # --max-tokens 24 / --tokens-per-sample 8
    assert task.streams_per_rank("valid") == 2  # 19 tokens: 2 streams of 9+ (3 of 6 would not hold a segment)
    task.load_dataset("valid")
    assert task.dataset("valid").streams_per_rank == 2


def test_batches_come_in_order_and_cover_the_split(data_dir):
    task = setup_task(data_dir)
    assert isinstance(task, SegmentLMTask)
    task.load_dataset("train")
    ds = task.dataset("train")
    expected = encode(LINES["train"], task.dictionary)
    assert np.array_equal(np.asarray(ds.tokens), expected)
    batches = list(task.get_batch_iterator(ds, seed=7, epoch=2).next_epoch_itr(shuffle=True))
    assert len(batches) == len(ds) > 1
    for i, batch in enumerate(batches):  # shuffle=True must not shuffle streams
        assert torch.equal(batch["target"], ds[i]["target"])
        assert torch.equal(batch["net_input"]["src_tokens"], ds[i]["net_input"]["src_tokens"])
    _, targets = rows(ds)
    assert np.array_equal(np.concatenate(targets), expected)
    assert sum(b["ntokens"] for b in batches) == len(expected)


def test_flat_tokens_memmap_equals_the_items(data_dir):
    from fairseq.data import data_utils

    dictionary = Dictionary.load(str(data_dir / "dict.txt"))
    dataset = data_utils.load_indexed_dataset(str(data_dir / "train"), dictionary, None)
    flat = flat_tokens(dataset, str(data_dir / "train.bin"))
    assert isinstance(flat, np.memmap)
    assert np.array_equal(flat, flat_tokens(dataset))  # the concatenation fallback
    assert np.array_equal(flat, encode(LINES["train"], dictionary))


def test_validation_uses_its_own_batch_size(data_dir):
    task = setup_task(data_dir, batch_size_valid=1)
    task.load_dataset("valid")
    ds = task.dataset("valid")
    assert ds.streams_per_rank == 1
    _, targets = rows(ds)
    assert np.array_equal(targets[0], encode(LINES["valid"], task.dictionary))


def test_streams_from_max_tokens_or_an_error(data_dir):
    assert setup_task(data_dir, batch_size=None, max_tokens=32).streams_per_rank("train") == 4
    with pytest.raises(UserError, match="less than one segment"):
        setup_task(data_dir, batch_size=None, max_tokens=4).streams_per_rank("train")
    with pytest.raises(UserError, match="number of streams"):
        setup_task(data_dir, batch_size=None, batch_size_valid=None).streams_per_rank("train")
    # an evaluation split given no size (fairseq-eval-lm without --batch-size) is one stream
    assert setup_task(data_dir, batch_size=None, batch_size_valid=None).streams_per_rank("valid") == 1


def test_token_unit(data_dir, tmp_path):
    assert setup_task(data_dir).token_unit == "byte"  # guessed from the byte dictionary
    assert setup_task(data_dir, token_unit="word").token_unit == "word"
    copy = tmp_path / "bin"
    shutil.copytree(data_dir, copy)
    (copy / "metadata.json").write_text(json.dumps({"unit": "char"}))
    assert setup_task(copy).token_unit == "char"  # preprocess/'s metadata wins over the guess


def _dictionary(symbols, padding_factor=None) -> Dictionary:
    d = Dictionary()
    for s in symbols:
        d.add_symbol(s)
    if padding_factor:
        d.finalize(padding_factor=padding_factor)  # what fairseq-preprocess does without --srcdict
    return d


def test_guess_token_unit():
    assert guess_token_unit(None, _dictionary([str(i) for i in range(256)])) == "byte"
    assert guess_token_unit(None, _dictionary(list("abcdefg"))) == "char"
    assert guess_token_unit(None, _dictionary(["the", "cat", "a"])) == "word"
    assert guess_token_unit(None, _dictionary([])) == "word"


def test_guess_token_unit_ignores_dictionary_padding():
    """fairseq-preprocess without --srcdict pads the dictionary to a multiple of 8 with
    ``madeupword0000``...; those symbols say nothing about the unit."""
    byte_dict = _dictionary([str(i) for i in range(101)], padding_factor=8)  # 105 -> 112 entries
    assert any(s.startswith("madeupword") for s in byte_dict.symbols)
    assert guess_token_unit(None, byte_dict) == "byte"
    assert guess_token_unit(None, _dictionary(list("abcde"), padding_factor=8)) == "char"


def test_missing_split_is_a_user_error(data_dir):
    task = setup_task(data_dir)
    with pytest.raises(UserError, match="split 'test' not found"):
        task.load_dataset("test")


def test_dictionary_that_does_not_match_the_data(data_dir, tmp_path):
    copy = tmp_path / "bin"
    shutil.copytree(data_dir, copy)
    (copy / "dict.txt").write_text("".join(f"{i} 1\n" for i in range(100)))  # 'h' is byte 104
    task = setup_task(copy)
    with pytest.raises(UserError, match="does not belong to this data"):
        task.load_dataset("train")


def test_too_many_streams_for_the_split_is_a_user_error(data_dir):
    task = setup_task(data_dir, batch_size=1000, batch_size_valid=1000)
    with pytest.raises(UserError, match="--batch-size"):
        task.load_dataset("valid")


@pytest.mark.parametrize(
    "fields, message",
    [(dict(tokens_per_sample=0), "tokens-per-sample"), (dict(sample_break_mode="eos"), "sample-break-mode")],
)
def test_setup_task_rejects(data_dir, fields, message):
    with pytest.raises(UserError, match=message):
        setup_task(data_dir, **fields)


def test_setup_task_needs_a_binarized_directory(tmp_path):
    with pytest.raises(UserError, match="not found"):
        setup_task(tmp_path / "missing")
    with pytest.raises(UserError, match="no dict.txt"):
        setup_task(tmp_path)


def test_eval_lm_dataloader(data_dir):
    task = setup_task(data_dir)
    task.load_dataset("train")
    ds = task.dataset("train")
    with pytest.raises(UserError, match="context-window"):
        task.eval_lm_dataloader(ds, context_window=4)
    batches = list(task.eval_lm_dataloader(ds, batch_size=3, num_workers=0))
    assert all(b["net_input"]["src_tokens"].size(0) == 3 for b in batches)
    relaid = ds.with_streams(3)
    assert len(batches) == len(relaid)
    for i, batch in enumerate(batches):
        assert torch.equal(batch["target"], relaid[i]["target"])
    assert sum(b["ntokens"] for b in batches) == len(ds.tokens)


def test_epoch_hooks_reset_the_memory_of_their_mode(data_dir):
    """Validation always starts afresh; a training epoch does not reset (its first batch, at offset 0,
    starts afresh by itself, and a run resumed mid-epoch must keep the memory of its checkpoint)."""

    class Recorder:
        def __init__(self):
            self.calls = []

        def reset_memory(self, mode=None):
            self.calls.append(mode)

    task, model = setup_task(data_dir), Recorder()
    task.begin_epoch(1, model)
    task.begin_valid_epoch(1, model)
    assert model.calls == ["eval"]


def test_epoch_hooks_on_a_model_with_memory(data_dir, lm):
    task = setup_task(data_dir)
    model = lm(task.dictionary, pos_emb="none", mem_len=8)
    seg = torch.randint(4, len(task.dictionary), (2, 8))
    with torch.no_grad():
        model.train()(seg, stream_offset=0)
        model.eval()(seg, stream_offset=0)
    train_memory = model.decoder.stream_memory["train"]
    task.begin_epoch(2, model)
    assert model.decoder.stream_memory["train"] is train_memory
    task.begin_valid_epoch(2, model)
    assert set(model.decoder.stream_memory) == {"train"}


def test_a_model_with_memory_scores_the_task_batches(data_dir, lm):
    """Stream memory over the task's batches: one stream fed segment by segment gives the same
    log-probabilities as one pass over the whole split (mem_len covers it)."""
    task = setup_task(data_dir, batch_size_valid=1)
    task.load_dataset("valid")
    ds = task.dataset("valid")
    model = lm(task.dictionary, pos_emb="none", mem_len=64).eval()
    task.begin_valid_epoch(1, model)
    with torch.no_grad():
        segments = [model(**b["net_input"])[0] for b in task.get_batch_iterator(ds).next_epoch_itr(shuffle=False)]
        whole = torch.cat([torch.tensor([EOS]), torch.from_numpy(np.asarray(ds.tokens[:-1], dtype=np.int64))])
        model.reset_memory()
        reference = model(whole[None])[0]
    assert len(segments) > 1
    torch.testing.assert_close(torch.cat(segments, dim=1), reference, rtol=0, atol=1e-5)
