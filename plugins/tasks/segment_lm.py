"""``segment_lm``: language modeling over contiguous streams, for models with memory (and without).

Differences from fairseq's ``language_modeling`` (which it extends, so sampling with
``fairseq-interactive``/``fairseq-generate`` works unchanged):

- training, validation and ``fairseq-eval-lm`` read the split as contiguous streams
  (``SegmentStreamDataset``): batch i+1 continues batch i, every token is scored exactly once;
- every batch carries its offset in the streams (``stream_offset``): the model's memory starts empty at
  offset 0 (every epoch, every validation pass) and survives a mid-epoch resume from a checkpoint;
- ``--context-window`` is rejected: memory, not overlapping windows, gives a model its long context;
- the data's unit (byte / char / word / subword) is known, so the criterion labels bpb / bpc / ppl, and so
  does ``fairseq-eval-lm`` (its "Perplexity" line becomes the unit's metric);
- the criterion is ``aux_cross_entropy`` (fairseq's default ``cross_entropy`` would drop the model's
  auxiliary losses); a segment longer than the streams of a split is refused before any work;
- ``--model-overrides`` keys that no option has are refused (fairseq ignores them), and the memory in
  force is logged;
- text in, text out: without ``--bpe``, ``fairseq-interactive`` (and the hub's ``sample``/``score``) use
  the data's own text encoder named in ``metadata.json`` (``--bpe char_level``/``byte_level``,
  ``plugins/text_encoders.py``), and a prompt symbol that is not in the dictionary is named in a
  warning instead of silently becoming ``<unk>``.
- the binarized data is checked before any work, and every checkpoint carries a fingerprint of the
  dictionary and the training data, compared when it is loaded (``plugins/data_integrity.py``).
"""

import logging
import os
import re
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq import utils
from fairseq.data import Dictionary, data_utils, encoders, iterators
from fairseq.dataclass import ChoiceEnum
from fairseq.dataclass.configs import FairseqConfig
from fairseq.distributed import utils as dist_utils
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask
from fairseq.tokenizer import tokenize_line
from omegaconf import II, OmegaConf

from .. import cli, data_integrity
from ..criterions.aux_cross_entropy import UNIT_METRIC
from ..errors import UserError
from .stream_dataset import SegmentStreamDataset, flat_tokens

logger = logging.getLogger(__name__)

TOKEN_UNITS = ("byte", "char", "word", "subword")
CRITERION = "aux_cross_entropy"
FAIRSEQ_DEFAULT_CRITERION = "cross_entropy"  # fairseq's --criterion default (fairseq/criterions/__init__.py)
MEMORY_OPTIONS = {"mem_len": None, "cmem_len": "compressive", "compression_rate": "compressive", "max_span": "adaptive_span"}  # fmt: skip


@dataclass
class SegmentLMConfig(LanguageModelingConfig):
    token_unit: ChoiceEnum(("auto",) + TOKEN_UNITS) = field(
        default="auto",
        metadata={"help": "what one token is, for the logged metric (byte: bpb, char: bpc, word/subword: ppl); "
                  "auto: read <data>/metadata.json written by preprocess/, else guess from the dictionary"},
    )  # fmt: skip
    max_tokens: Optional[int] = II("dataset.max_tokens")
    max_tokens_valid: Optional[int] = II("dataset.max_tokens_valid")
    train_subset: str = II("dataset.train_subset")


def data_text_encoder(data_dir: Optional[str]) -> Optional[str]:
    """The ``--bpe`` that turns text into the data's symbols and back: metadata.json's ``encoder``; for
    data written before it recorded one, the encoder of its unit; None for words (and without metadata)."""
    meta = data_integrity.read_metadata(data_dir) if data_dir else None
    if meta is None:
        return None
    if "encoder" in meta:
        return meta["encoder"]
    return {"byte": "byte_level", "char": "char_level", "subword": "sentencepiece"}.get(meta.get("unit"))


def guess_token_unit(data_dir: Optional[str], dictionary) -> str:
    meta = data_integrity.read_metadata(data_dir) if data_dir else None
    if meta is not None and meta.get("unit") in TOKEN_UNITS:
        return meta["unit"]
    # fairseq-preprocess pads the dictionary to a multiple of 8 with madeupword0000, ...: not data
    symbols = [s for s in dictionary.symbols[dictionary.nspecial :] if not s.startswith("madeupword")]
    if symbols and all(s.isdigit() and int(s) < 256 for s in symbols):
        return "byte"  # preprocess/ writes bytes as their decimal value
    if symbols and all(len(s) == 1 for s in symbols):
        return "char"
    return "word"


class UnitMetricFilter(logging.Filter):
    """fairseq-eval-lm's result line in the data's metric: ``Loss (base 2): 1.9, bpc: 1.9`` for characters
    (bits per character is the base-2 loss per token), bpb for bytes; words and subwords keep perplexity."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def filter(self, record: logging.LogRecord) -> bool:
        metric = UNIT_METRIC.get(self.unit, "ppl")
        match = re.match(r"Loss \(base 2\): ([\d.]+), Perplexity: ", str(record.msg))
        if match and metric != "ppl":
            record.msg, record.args = f"Loss (base 2): {match[1]}, {metric}: {match[1]} ({self.unit}-level data)", ()
        return True


def install_unit_metric(unit: str) -> None:
    eval_lm_logger = logging.getLogger("fairseq_cli.eval_lm")
    for old in [f for f in eval_lm_logger.filters if isinstance(f, UnitMetricFilter)]:
        eval_lm_logger.removeFilter(old)
    eval_lm_logger.addFilter(UnitMetricFilter(unit))


def _option_names(cfg) -> list:
    """The option names of a config: a DictConfig, or the argparse.Namespace of a legacy model (lstm_lm)."""
    return list(vars(cfg)) if isinstance(cfg, Namespace) else list(cfg.keys())


def known_option_names(model_cfg, task_cfg) -> set:
    """Every name ``--model-overrides`` can set: the model's and the task's options, every group of
    fairseq's configuration and their fields (what ``overwrite_args_by_name`` looks for)."""
    names = set(_option_names(model_cfg)) | set(_option_names(task_cfg))
    config = FairseqConfig()
    for group in FairseqConfig.__dataclass_fields__:
        names.add(group)
        default = getattr(config, group, None)
        if hasattr(default, "__dataclass_fields__"):
            names |= set(default.__dataclass_fields__)
    return names


def describe_memory(model_cfg, overrides: Optional[dict] = None) -> str:
    """One line: the memory options in force (e.g. ``mem_len=1600 (override), cmem_len=16``) and the overrides."""
    attention, names = getattr(model_cfg, "attention", None), _option_names(model_cfg)
    parts = [
        f"{name}={getattr(model_cfg, name)}" + (" (override)" if overrides and name in overrides else "")
        for name, owner in MEMORY_OPTIONS.items()
        if name in names and (owner is None or owner == attention)
    ]
    return f"memory in force: {', '.join(parts) or 'none (this model has no memory option)'}; model overrides: {overrides or 'none'}"


def check_segment_fits(dataset: SegmentStreamDataset, split: str) -> None:
    """A segment longer than a stream is mostly padding, and its cost grows with its length, not with the
    data (--tokens-per-sample 100000 on PTB: no update in minutes; 200000 in eval-lm: 108 GB). Rule: every
    stream holds at least one full segment, i.e. --tokens-per-sample <= the shortest stream."""
    streams = dataset.streams_per_rank * dataset.world_size
    shortest = len(dataset.tokens) // streams  # the same on every worker (a worker's own may be one longer)
    if dataset.segment_len > shortest:
        raise UserError(
            f"--tokens-per-sample {dataset.segment_len} is longer than the streams of the {split} split: its "
            f"{len(dataset.tokens):,} tokens make {streams} streams (--batch-size {dataset.streams_per_rank} x "
            f"{dataset.world_size} workers) of {shortest:,} tokens; use --tokens-per-sample <= {shortest} "
            "(one full segment per stream) or fewer streams (--batch-size, or --batch-size-valid for validation)"
        )


def data_parallel_position() -> dict:
    if not torch.distributed.is_initialized():
        return {"world_size": 1, "rank": 0}
    return {"world_size": dist_utils.get_data_parallel_world_size(), "rank": dist_utils.get_data_parallel_rank()}


@register_task("segment_lm", dataclass=SegmentLMConfig)
class SegmentLMTask(LanguageModelingTask):
    @classmethod
    def setup_task(cls, args, **kwargs):
        if args.tokens_per_sample <= 0:
            raise UserError(f"--tokens-per-sample must be positive, got {args.tokens_per_sample}")
        if args.sample_break_mode not in (None, "none"):
            raise UserError("segment_lm streams the corpus contiguously: drop --sample-break-mode")
        if not args.data or not os.path.isdir(utils.split_paths(args.data)[0]):
            raise UserError(f"data directory '{args.data}' not found: binarize a corpus with preprocess/ first")
        dict_path = os.path.join(utils.split_paths(args.data)[0], "dict.txt")
        if not os.path.exists(dict_path):
            raise UserError(f"'{args.data}' has no dict.txt: it is not a fairseq-preprocess output directory")
        try:
            dictionary = Dictionary.load(dict_path)  # fairseq raises a bare Exception/... with a traceback
        except Exception as e:
            reason = " ".join(str(e).split(". ")[0].split())
            raise UserError(f"{dict_path} is not a valid dictionary ({reason}): binarize the data again") from None
        for data_dir in utils.split_paths(args.data):
            data_integrity.check_data_dir(data_dir, dictionary)  # .idx/.bin/dict.txt vs metadata.json
        return super().setup_task(args, **kwargs)

    def __init__(self, args, dictionary, output_dictionary=None, targets=None):
        super().__init__(args, dictionary, output_dictionary, targets)
        unit = args.token_unit
        self.token_unit = guess_token_unit(utils.split_paths(args.data)[0] if args.data else None, dictionary) if unit == "auto" else unit  # fmt: skip
        self.data_dir = utils.split_paths(args.data)[0] if args.data else None
        self.text_encoder = data_text_encoder(self.data_dir)
        logger.info(f"token unit: {self.token_unit}" + (f"; text encoder: {self.text_encoder}" if self.text_encoder else ""))  # fmt: skip
        install_unit_metric(self.token_unit)

    def build_bpe(self, args):
        """The text encoder of ``fairseq-interactive`` and the hub: the ``--bpe`` given, else the data's own
        (metadata.json's ``encoder``: ``char_level``/``byte_level``, or ``sentencepiece`` with the data's
        ``spm.model``), so text prompts work with no flag."""
        bpe = super().build_bpe(args) if args is not None else None
        if bpe is None and self.text_encoder == "sentencepiece":
            model = os.path.join(self.data_dir, "spm.model")
            bpe = encoders.build_bpe(Namespace(bpe="sentencepiece", sentencepiece_model=model))
        elif bpe is None and self.text_encoder:
            bpe = encoders.build_bpe(self.text_encoder)
        return bpe

    def encode_prompt(self, symbols: str) -> torch.LongTensor:
        """Encoded prompt (its symbols, after the text encoder) -> token ids, as fairseq's
        ``encode_line(..., add_if_not_exist=False)``; symbols the dictionary lacks are named in one warning
        (they become ``<unk>``, which the model reads as "some unseen symbol")."""
        dictionary = self.source_dictionary
        tokens = dictionary.encode_line(symbols, add_if_not_exist=False).long()
        if bool((tokens == dictionary.unk()).any()):
            unseen = [w for w in tokenize_line(symbols) if w != dictionary.unk_word and dictionary.index(w) == dictionary.unk()]  # fmt: skip
            if unseen:
                logger.warning(
                    f"the prompt has {len(unseen)} symbol(s) not in the dictionary, read as <unk>: "
                    + ", ".join(repr(w) for w in dict.fromkeys(unseen))
                )
        return tokens

    def get_interactive_tokens_and_lengths(self, lines, encode_fn):
        tokens = [self.encode_prompt(encode_fn(line)) for line in lines]
        return tokens, [t.numel() for t in tokens]

    def symbols_of(self, tokens: torch.Tensor) -> str:
        """Token ids -> symbols for the text encoder's ``decode``: a newline inside (``</s>``) is kept, the
        final ``</s>`` (where generation stopped) is dropped (fairseq's ``Dictionary.string`` drops every one)."""
        dictionary = self.target_dictionary
        if len(tokens) and int(tokens[-1]) == dictionary.eos():
            tokens = tokens[:-1]
        return dictionary.string(tokens, include_eos=True)

    def data_fingerprint(self) -> dict:
        """The dictionary's and the training data's fingerprints (``plugins/data_integrity.py``)."""
        if getattr(self, "_data_fingerprint", None) is None:
            data_dir = utils.split_paths(self.args.data)[0]
            self._data_fingerprint = data_integrity.fingerprint(self.dictionary, data_dir, self.args.train_subset)
        return self._data_fingerprint

    def state_dict(self):
        """What fairseq saves as the checkpoint's ``task_state``: the data fingerprint, added."""
        return {**super().state_dict(), "data_fingerprint": self.data_fingerprint()}

    def load_state_dict(self, state_dict):
        """Called by fairseq-eval-lm, fairseq-interactive, fairseq-generate and the hub with a checkpoint's
        ``task_state``: a model trained with another dictionary is refused."""
        state_dict = dict(state_dict or {})
        saved = state_dict.pop("data_fingerprint", None)
        data_dir = utils.split_paths(self.args.data)[0]
        checkpoint = cli.typed_value("--path") or "the checkpoint"
        data_integrity.compare(saved, self.data_fingerprint(), checkpoint, data_dir, resume=False)
        super().load_state_dict(state_dict)

    def build_criterion(self, cfg):
        """``aux_cross_entropy``: cross entropy plus the model's auxiliary losses (compression, span, ...),
        logged in the data's metric. fairseq's default ``cross_entropy`` is replaced by it; any criterion
        typed on the command line that is not it is refused (it would train without the auxiliary losses)."""
        name = getattr(cfg, "_name", None)
        if name != CRITERION:
            if name != FAIRSEQ_DEFAULT_CRITERION or cli.typed("--criterion"):
                raise UserError(
                    f"--criterion {name} cannot add the model's auxiliary losses (compression, span, ...) nor "
                    f"label {self.token_unit} data with {UNIT_METRIC.get(self.token_unit, 'ppl')}: "
                    f"--task segment_lm trains with --criterion {CRITERION}; drop --criterion {name}"
                )
            logger.info(
                f"criterion: {CRITERION} (segment_lm's own; fairseq's default {name} would drop auxiliary losses)"
            )
            cfg = OmegaConf.create({"_name": CRITERION, "sentence_avg": bool(cfg.get("sentence_avg", False))})
        return super().build_criterion(cfg)

    def build_model(self, cfg, from_checkpoint=False):
        """On a checkpoint loaded by a fairseq-* command with ``--model-overrides``: refuse keys that no
        option has (fairseq would ignore a typo such as mem_lenn), and log the memory in force."""
        overrides = cli.model_overrides() if from_checkpoint else None
        if overrides:
            cli.check_override_keys(overrides, known_option_names(cfg, self.args))
        model = super().build_model(cfg, from_checkpoint=from_checkpoint)
        if from_checkpoint:
            logger.info(describe_memory(cfg, overrides))
        return model

    def streams_per_rank(self, split: str) -> int:
        """Streams (rows of every batch) per worker: --batch-size, or --max-tokens / --tokens-per-sample;
        one stream (the longest context) for an evaluation split given neither (e.g. fairseq-eval-lm)."""
        train = split == self.args.train_subset
        bsz = self.args.batch_size if train else (self.args.batch_size_valid or self.args.batch_size)
        max_tokens = self.args.max_tokens if train else (self.args.max_tokens_valid or self.args.max_tokens)
        if bsz is None and max_tokens is not None:
            bsz = max_tokens // self.args.tokens_per_sample
            if bsz <= 0:
                raise UserError(f"--max-tokens {max_tokens} is less than one segment (--tokens-per-sample)")
        if bsz is None:
            if train:
                raise UserError("segment_lm needs the number of streams: give --batch-size")
            return 1
        if bsz <= 0:
            raise UserError(f"--batch-size must be positive, got {bsz}")
        return bsz

    def load_dataset(self, split: str, epoch=1, combine=False, **kwargs):
        data_path = utils.split_paths(self.args.data)[(epoch - 1) % len(utils.split_paths(self.args.data))]
        split_path = os.path.join(data_path, split)
        if os.path.exists(split_path + ".bin") and os.path.getsize(split_path + ".bin") == 0:
            raise UserError(f"split '{split}' in {data_path} is empty (no tokens): binarize it from a non-empty file")
        dataset = data_utils.load_indexed_dataset(split_path, self.dictionary, self.args.dataset_impl)
        if dataset is None:
            raise UserError(f"split '{split}' not found in {data_path} (expected {split}.bin / {split}.idx)")
        tokens = flat_tokens(dataset, split_path + ".bin")
        if len(tokens) and int(tokens.max()) >= len(self.dictionary):
            raise UserError(
                f"{split_path}.bin holds token id {int(tokens.max())} but dict.txt has {len(self.dictionary)} "
                "entries: the dictionary does not belong to this data; binarize again with its dictionary"
            )
        self.datasets[split] = SegmentStreamDataset(
            tokens,
            eos=self.dictionary.eos(),
            pad=self.dictionary.pad(),
            segment_len=self.args.tokens_per_sample,
            streams_per_rank=self.streams_per_rank(split),
            **data_parallel_position(),
        )
        ds = self.datasets[split]
        check_segment_fits(ds, split)
        logger.info(
            f"{split}: {ds.num_targets} targets, {ds.streams_per_rank} streams of {int(ds.stream_len.min())}+ tokens "
            f"x {len(ds)} segments of {ds.segment_len} (rank {ds.rank}/{ds.world_size})"
        )

    def get_batch_iterator(self, dataset, max_tokens=None, max_sentences=None, max_positions=None,
                           ignore_invalid_inputs=False, required_batch_size_multiple=1, seed=1, num_shards=1,
                           shard_id=0, num_workers=0, epoch=1, data_buffer_size=0, disable_iterator_cache=False,
                           skip_remainder_batch=False, grouped_shuffling=False, update_epoch_batch_itr=False):  # fmt: skip
        if not isinstance(dataset, SegmentStreamDataset):  # e.g. generation's inference dataset
            return super().get_batch_iterator(
                dataset, max_tokens, max_sentences, max_positions, ignore_invalid_inputs,
                required_batch_size_multiple, seed, num_shards, shard_id, num_workers, epoch,
                data_buffer_size, disable_iterator_cache, skip_remainder_batch, grouped_shuffling,
                update_epoch_batch_itr,
            )  # fmt: skip
        # One item is one batch; batches come in order. The dataset is already this rank's shard.
        return iterators.EpochBatchIterator(
            dataset=dataset,
            collate_fn=dataset.collater,
            batch_sampler=[[i] for i in range(len(dataset))],
            seed=seed,
            num_workers=num_workers,
            epoch=epoch,
            buffer_size=data_buffer_size,
            disable_shuffling=True,
        )

    def eval_lm_dataloader(self, dataset, max_tokens=36000, batch_size=None, max_positions=None, num_shards=1,
                           shard_id=0, num_workers=1, data_buffer_size=10, context_window=0):  # fmt: skip
        if context_window > 0:
            raise UserError(
                "segment_lm scores every token once in contiguous segments; --context-window does not apply. "
                "Give the model context with memory instead: --model-overrides \"{'mem_len': M}\""
            )
        if batch_size is not None and batch_size != dataset.streams_per_rank:
            dataset = dataset.with_streams(batch_size)
            check_segment_fits(dataset, "evaluated")
        return self.get_batch_iterator(dataset, num_workers=num_workers, data_buffer_size=data_buffer_size).next_epoch_itr(shuffle=False)  # fmt: skip

    def optimizer_step(self, optimizer, model, update_num):
        """The step, then every module's ``after_optimizer_step()`` (e.g. adaptive span keeps its span
        parameters in [0, 1]): fairseq offers plugins no other place that runs after each update."""
        super().optimizer_step(optimizer, model, update_num)
        for module in model.modules():
            hook = getattr(module, "after_optimizer_step", None)
            if callable(hook):
                hook()

    # No reset in begin_epoch: every batch carries its ``stream_offset`` and the decoder only uses a
    # memory left by the segment ending there, so a new epoch (offset 0) starts afresh while a run
    # resumed mid-epoch keeps the memory restored from its checkpoint.
    def begin_valid_epoch(self, epoch, model):
        super().begin_valid_epoch(epoch, model)
        if hasattr(model, "reset_memory"):
            model.reset_memory("eval")
