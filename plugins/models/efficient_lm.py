"""``efficient_lm``: one decoder-only LM where attention, memory, positions and feed-forward are
chosen independently (``--attention``, ``--mem-len``, ``--pos-emb``, ``--decoder-ffn-embed-dim``).

Sizes use fairseq ``transformer_lm``'s option names. The options of every registered attention are
merged into this model's config (each mechanism declares them next to its code), so a new mechanism
brings its command-line options with it.

Presets (``--arch``) only set defaults; anything given on the command line wins.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from fairseq import options, utils
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import FairseqLanguageModel, register_model
from omegaconf import II
from torch import Tensor

from ..attention import ATTENTION_REGISTRY, Attention, AuxLoss
from ..errors import UserError
from ..modules.positional import POSITIONAL_REGISTRY
from .config_defaults import fill_missing_options
from .decoder import EfficientDecoder

ABSOLUTE_POSITIONS = ("sinusoidal", "learned")
ATTENTION_POSITIONS = (
    "relative",
    "rotary",
    "alibi",
)  # computed inside an attention that declares it in encodes_positions


@dataclass
class EfficientLMBaseConfig(FairseqDataclass):
    attention: ChoiceEnum(sorted(ATTENTION_REGISTRY)) = field(
        default="full", metadata={"help": "attention mechanism (plugins/attention/<name>.py)"}
    )
    pos_emb: ChoiceEnum(sorted(POSITIONAL_REGISTRY)) = field(
        default="sinusoidal", metadata={"help": "positional encoding"}
    )
    mem_len: int = field(
        default=0,
        metadata={"help": "segment memory: positions of the previous segments every layer attends to (0: none); "
                  "needs --task segment_lm so consecutive batches continue the same streams"},
    )  # fmt: skip
    decoder_layers: int = field(default=6, metadata={"help": "number of decoder layers"})
    decoder_embed_dim: int = field(default=512, metadata={"help": "model dimension"})
    decoder_ffn_embed_dim: int = field(
        default=2048, metadata={"help": "feed-forward inner dimension (0: no feed-forward sublayer)"}
    )
    decoder_attention_heads: int = field(default=8, metadata={"help": "attention heads"})
    decoder_normalize_before: bool = field(
        default=False, metadata={"help": "pre-norm residual blocks (LayerNorm before each sublayer)"}
    )
    dropout: float = field(default=0.1, metadata={"help": "dropout on embeddings and sublayer outputs"})
    attention_dropout: float = field(default=0.0, metadata={"help": "dropout on attention weights"})
    activation_dropout: float = field(default=0.0, metadata={"help": "dropout after the feed-forward activation"})
    activation_fn: ChoiceEnum(utils.get_available_activation_fns()) = field(
        default="relu", metadata={"help": "feed-forward activation"}
    )
    share_layers: bool = field(
        default=False, metadata={"help": "one layer's weights reused at every depth (Universal Transformer)"}
    )
    share_layers_timestep_emb: bool = field(
        default=False,
        metadata={"help": "with --share-layers: add a sinusoidal embedding of the recurrence step before every "
                  "application of the shared layer (Universal Transformer's timestep signal, Dehghani et al. 2019)"},
    )  # fmt: skip
    share_decoder_input_output_embed: bool = field(
        default=False, metadata={"help": "tie input embedding and output projection"}
    )
    no_scale_embedding: bool = field(default=False, metadata={"help": "do not scale embeddings by sqrt(D)"})
    adaptive_input: bool = field(default=False, metadata={"help": "adaptive input embeddings (Baevski & Auli 2019)"})
    adaptive_input_factor: float = field(default=4, metadata={"help": "adaptive input dimension shrink factor"})
    adaptive_input_cutoff: Optional[str] = field(
        default=None, metadata={"help": "comma-separated adaptive input cutoffs"}
    )
    adaptive_softmax_cutoff: Optional[str] = field(
        default=None, metadata={"help": "comma-separated adaptive softmax cutoffs (Grave et al. 2017)"}
    )
    adaptive_softmax_dropout: float = field(default=0.0, metadata={"help": "dropout in adaptive softmax tails"})
    adaptive_softmax_factor: float = field(default=4, metadata={"help": "adaptive softmax dimension shrink factor"})
    tie_adaptive_weights: bool = field(default=False, metadata={"help": "tie adaptive input and softmax weights"})
    tie_adaptive_proj: bool = field(default=False, metadata={"help": "tie adaptive input and softmax projections"})
    autocast_bf16: bool = field(
        default=False,
        metadata={"help": "run the decoder layers under torch.autocast(bfloat16) on CPU or GPU (fairseq's "
                  "--bf16 means TPU); logits and loss stay float32"},
    )  # fmt: skip
    reversible: bool = field(
        default=False,
        metadata={"help": "reversible residual layers (Reformer Sec. 3): Y1 = X1 + Attn(X2), Y2 = X2 + FFN(Y1); "
                  "training recomputes activations in the backward pass instead of storing them (needs "
                  "--decoder-normalize-before, no --mem-len)"},
    )  # fmt: skip
    ffn_chunks: int = field(
        default=1,
        metadata={"help": "compute the feed-forward in this many chunks along the sequence (Reformer Sec. 3): "
                  "same output, smaller peak memory when activations are not stored"},
    )  # fmt: skip
    tokens_per_sample: int = II("task.tokens_per_sample")
    max_target_positions: Optional[int] = II("task.max_target_positions")


def _merge_attention_options(base):
    """Subclass ``base`` with the option fields of every registered attention."""
    merged: Dict[str, dataclasses.Field] = {}
    for _, entry in sorted(ATTENTION_REGISTRY.items()):
        for f in dataclasses.fields(entry.config):
            if f.name in merged and (merged[f.name].type, merged[f.name].default) != (f.type, f.default):
                raise TypeError(f"attention option '{f.name}' is declared differently by two mechanisms")
            merged[f.name] = f
    fields = [(f.name, f.type, field(default=f.default, metadata=f.metadata)) for f in merged.values()]
    return dataclasses.make_dataclass("EfficientLMConfig", fields, bases=(base,))


EfficientLMConfig = _merge_attention_options(EfficientLMBaseConfig)


def _declares(attention: str, option: str) -> bool:
    """Whether mechanism ``attention`` declares ``option`` in its config (i.e. supports it)."""
    return option in {f.name for f in dataclasses.fields(ATTENTION_REGISTRY[attention].config)}


def validate_config(cfg) -> None:
    """Reject bad or meaningless combinations before any data is read or weights are built."""
    if cfg.attention not in ATTENTION_REGISTRY:
        raise UserError(f"unknown --attention '{cfg.attention}': choose one of {', '.join(sorted(ATTENTION_REGISTRY))}")
    if cfg.pos_emb not in POSITIONAL_REGISTRY:
        raise UserError(f"unknown --pos-emb '{cfg.pos_emb}': choose one of {', '.join(sorted(POSITIONAL_REGISTRY))}")
    for name in ("decoder_layers", "decoder_embed_dim", "decoder_attention_heads"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in ("mem_len", "decoder_ffn_embed_dim"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.decoder_embed_dim % cfg.decoder_attention_heads != 0:
        raise UserError(
            f"--decoder-attention-heads {cfg.decoder_attention_heads} does not divide --decoder-embed-dim "
            f"{cfg.decoder_embed_dim}; choose heads that divide the model dimension"
        )
    attention = ATTENTION_REGISTRY[cfg.attention].cls
    persistent = getattr(cfg, "persistent_mem_size", 0)
    if persistent < 0:
        raise UserError(f"--persistent-mem-size must be >= 0 (0: no persistent memory), got {persistent}")
    if persistent > 0 and not _declares(cfg.attention, "persistent_mem_size"):
        supported = sorted(name for name in ATTENTION_REGISTRY if _declares(name, "persistent_mem_size"))
        raise UserError(
            f"--attention {cfg.attention} has no persistent memory: use one of {', '.join(supported)}, "
            "or drop --persistent-mem-size"
        )
    if cfg.mem_len > 0 and not attention.supports_memory:
        raise UserError(f"--attention {cfg.attention} cannot attend over a memory; drop --mem-len")
    if cfg.pos_emb in ATTENTION_POSITIONS and cfg.pos_emb not in attention.encodes_positions:
        raise UserError(
            f"--pos-emb {cfg.pos_emb} is computed inside attention, and --attention {cfg.attention} does not: "
            "use --attention relative with --pos-emb relative, full/naive with rotary|alibi, or sinusoidal|learned|none"
        )
    if attention.requires_own_positions and cfg.pos_emb not in attention.encodes_positions:
        raise UserError(
            f"--attention {cfg.attention} encodes positions itself: use --pos-emb {attention.encodes_positions[0]}"
        )
    if getattr(cfg, "same_length", False) and cfg.mem_len == 0:
        raise UserError("--same-length makes every query see mem_len keys: it needs --mem-len > 0")
    if getattr(cfg, "clamp_len", 0) < 0:
        raise UserError(f"--clamp-len must be >= 0 (0: no clamp), got {cfg.clamp_len}")
    if cfg.mem_len > 0 and cfg.pos_emb in ABSOLUTE_POSITIONS:
        raise UserError(
            f"--mem-len needs positions that stay valid across segments; --pos-emb {cfg.pos_emb} is absolute "
            "(every segment would restart at position 0): use --attention relative --pos-emb relative (Transformer-XL) "
            "or --pos-emb none"
        )
    if getattr(cfg, "share_layers_timestep_emb", False) and not cfg.share_layers:
        raise UserError("--share-layers-timestep-emb marks the steps of a shared layer: add --share-layers")
    if cfg.adaptive_input and cfg.adaptive_input_cutoff is None:
        raise UserError("--adaptive-input needs --adaptive-input-cutoff (e.g. 20000,60000)")
    if cfg.tie_adaptive_weights and not (cfg.adaptive_input and cfg.adaptive_softmax_cutoff):
        raise UserError("--tie-adaptive-weights needs both --adaptive-input and --adaptive-softmax-cutoff")
    if cfg.share_decoder_input_output_embed and (cfg.adaptive_input or cfg.adaptive_softmax_cutoff):
        raise UserError("--share-decoder-input-output-embed is for plain embeddings; use --tie-adaptive-weights")
    _reject_options_of_other_attentions(cfg)
    if cfg.ffn_chunks < 1:
        raise UserError(f"--ffn-chunks must be >= 1 (1: no chunking), got {cfg.ffn_chunks}")
    if cfg.reversible:
        if cfg.mem_len > 0:
            raise UserError(
                "--reversible recomputes each layer from its outputs and cannot carry a memory: drop --mem-len"
            )
        if not cfg.decoder_normalize_before:
            raise UserError(
                "--reversible needs pre-norm sublayers (a post-norm residual cannot be inverted): "
                "add --decoder-normalize-before"
            )
        if cfg.share_layers_timestep_emb:
            raise UserError("--reversible does not add --share-layers-timestep-emb inside its couplings: drop one")
        if not attention.deterministic_recompute:
            raise UserError(
                f"--attention {cfg.attention} cannot recompute its output exactly in the backward pass: "
                "drop --reversible"
            )
    attention.check_config(cfg)


def _reject_options_of_other_attentions(cfg) -> None:
    """An option that only other mechanisms declare, set away from its default, would be silently ignored
    (e.g. --cmem-len with --attention relative): say so instead."""
    own = {f.name for f in dataclasses.fields(ATTENTION_REGISTRY[cfg.attention].config)}
    declared_by: Dict[str, list] = {}
    for name, entry in sorted(ATTENTION_REGISTRY.items()):
        for f in dataclasses.fields(entry.config):
            if f.name not in own:
                declared_by.setdefault(f.name, [f.default]).append(name)
    for option, (default, *mechanisms) in declared_by.items():
        if hasattr(cfg, option) and getattr(cfg, option) != default:
            owners = "|".join(mechanisms)
            raise UserError(
                f"--{option.replace('_', '-')} {getattr(cfg, option)} is an option of --attention {owners} and has "
                f"no effect with --attention {cfg.attention}: drop it (or reset the preset's value to {default}), "
                f"or use --attention {owners}"
            )


def parse_cutoffs(option: str, value: Optional[str], vocab_size: int) -> Optional[List[int]]:
    """``--adaptive-*-cutoff`` as a list of increasing cluster boundaries below the vocabulary size
    (fairseq's AdaptiveInput/AdaptiveSoftmax would fail later with an assertion or a negative size)."""
    if value is None:
        return None
    try:
        cutoffs = options.eval_str_list(value, type=int)
    except (ValueError, SyntaxError, TypeError):
        cutoffs = None
    if not cutoffs or any(b <= a for a, b in zip([0] + cutoffs, cutoffs)) or cutoffs[-1] > vocab_size:
        raise UserError(
            f"--{option} {value!r} must be increasing positive integers, the last at most the vocabulary "
            f"size {vocab_size} (e.g. 20000,60000 on WikiText-103)"
        )
    return cutoffs


def drop_absent_parameters(module) -> None:
    """Turn parameter slots that hold None (``nn.Linear(bias=False)``'s bias) into plain None attributes.
    fairseq's trainer catalogs shared parameters by identity, so every None slot looks like one parameter
    shared across the model ("detected shared parameter: ...r_proj.bias <- ...output_projection.bias")."""
    for m in module.modules():
        for name in [n for n, p in m._parameters.items() if p is None]:
            del m._parameters[name]
            object.__setattr__(m, name, None)


@register_model("efficient_lm", dataclass=EfficientLMConfig)
class EfficientLM(FairseqLanguageModel):
    @classmethod
    def build_model(cls, cfg, task):
        fill_missing_options(cfg, EfficientLMConfig)  # a checkpoint saved before an option existed
        if getattr(cfg, "max_target_positions", None) is None:
            cfg.max_target_positions = cfg.tokens_per_sample
        validate_config(cfg)
        for kind in ("input", "softmax"):
            vocab, factor = len(task.target_dictionary), getattr(cfg, f"adaptive_{kind}_factor")
            cutoffs = parse_cutoffs(f"adaptive-{kind}-cutoff", getattr(cfg, f"adaptive_{kind}_cutoff"), vocab)
            bands = 0 if cutoffs is None else len(cutoffs) + (cutoffs[-1] < vocab)
            if bands and (factor <= 0 or cfg.decoder_embed_dim // factor ** (bands - 1) < 1):
                raise UserError(
                    f"--adaptive-{kind}-factor {factor} leaves the last of {bands} bands of --decoder-embed-dim "
                    f"{cfg.decoder_embed_dim} no dimensions: use a factor >= 1 with factor^{bands - 1} <= the dimension"
                )
        decoder = EfficientDecoder(cfg, task.target_dictionary)
        attentions = [m for m in decoder.modules() if isinstance(m, Attention)]  # in depth order
        for index, attention in enumerate(attentions):
            attention.set_layer_index(index)
        drop_absent_parameters(decoder)
        return cls(decoder)

    @classmethod
    def from_pretrained(cls, model_name_or_path, checkpoint_file="model.pt", data_name_or_path=".", **kwargs):
        """fairseq's hub interface (``sample``, ``score``, ``generate``; pass ``user_dir=<repo>/plugins``), with
        text in and text out on character/byte data (``plugins/hub.py``). A
        model with memory scores a text longer than its segment in segments with the memory, as
        fairseq-eval-lm --batch-size 1 does (``EfficientDecoder.run_in_segments``)."""
        from fairseq import hub_utils

        from ..hub import EfficientLMHub

        loaded = hub_utils.from_pretrained(model_name_or_path, checkpoint_file, data_name_or_path,
                                           archive_map=cls.hub_models(), **kwargs)  # fmt: skip
        hub = EfficientLMHub(loaded["args"], loaded["task"], loaded["models"])  # text in, text out
        for model in hub.models:
            if hasattr(model.decoder, "read_in_segments"):
                model.decoder.read_in_segments = True
        return hub

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        """Refuse, with a clear message, a checkpoint trained on another dictionary (its vocabulary
        would silently mean other words, or fail with a tensor size mismatch)."""
        vocab = len(self.decoder.dictionary)
        for key in ("decoder.embed_tokens.weight", "decoder.output_projection.weight"):
            if key in state_dict and state_dict[key].size(0) != vocab:
                raise UserError(
                    f"the checkpoint was trained with a dictionary of {state_dict[key].size(0)} entries, but the "
                    f"data's dict.txt has {vocab}: evaluate on the data-bin it was trained on"
                )
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    def aux_losses(self, net_output) -> Dict[str, AuxLoss]:
        """Auxiliary losses of the forward pass that produced ``net_output``: name -> (value, weight)."""
        return net_output[1].get("aux_losses", {})

    def reset_memory(self, mode: Optional[str] = None) -> None:
        self.decoder.reset_memory(mode)

    def metrics(self) -> Dict[str, Tensor]:
        """What the attention layers report (``Attention.metrics``, e.g. learned spans), as
        ``<name>_l<layer>``; logged by the criterion."""
        return {f"{k}_l{i}": v for i, layer in enumerate(self.decoder.layers) for k, v in layer.attn.metrics().items()}
