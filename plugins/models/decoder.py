"""``EfficientDecoder``: the only bridge between fairseq and the explicit state below it.

Everything under this class is stateless: layers receive their memory and return the next one. This
class is where state is *kept* between calls, in exactly two places:

- ``incremental_state`` (fairseq's generator): the ``DecoderState`` of the sequences being generated,
  reordered by ``reorder_incremental_state`` for beam search;
- ``stream_memory`` (``segment_lm`` training/validation with ``--mem-len``): the detached
  ``DecoderState`` of the previous segment of every stream, one per mode (train / eval) so validation
  never leaks into training. It is used only if it ended where the new segment starts (see
  ``extract_features``), saved in checkpoints (``get_extra_state``) and reset at validation start.

Shape legend: B = batch (streams), T = segment length, D = model dim, V = vocabulary.
"""

import logging
import math
from typing import Optional

import torch
from fairseq import options
from fairseq.models import FairseqIncrementalDecoder
from fairseq.modules import AdaptiveInput, AdaptiveSoftmax
from torch import Tensor, nn

from ..attention import AuxLoss, build_attention
from ..memory import DecoderState
from ..modules.decoder_layer import DecoderLayer
from ..modules.feedforward import FeedForward
from ..modules.positional import SinusoidalPositions, build_positions
from ..modules.reversible import reversible_layers
from .stream_state import StreamStateMixin

logger = logging.getLogger(__name__)
UNBOUNDED_POSITIONS = 1 << 20  # only learned positions have a table to run out of


class EfficientDecoder(StreamStateMixin, FairseqIncrementalDecoder):
    stream_state_type = DecoderState

    def __init__(self, cfg, dictionary):
        super().__init__(dictionary)
        D = cfg.decoder_embed_dim
        V = len(dictionary)
        self.padding_idx = dictionary.pad()
        self.mem_len = cfg.mem_len
        self.autocast_bf16 = cfg.autocast_bf16
        self.max_target_positions = cfg.max_target_positions
        self.reversible = cfg.reversible

        if cfg.adaptive_input:
            self.embed_tokens = AdaptiveInput(
                V, self.padding_idx, D, cfg.adaptive_input_factor, D,
                options.eval_str_list(cfg.adaptive_input_cutoff, type=int), 0.0, 8,
            )  # fmt: skip
        else:
            self.embed_tokens = nn.Embedding(V, D, padding_idx=self.padding_idx)
            nn.init.normal_(self.embed_tokens.weight, std=D**-0.5)
            nn.init.zeros_(self.embed_tokens.weight[self.padding_idx])
        self.embed_scale = 1.0 if cfg.no_scale_embedding else math.sqrt(D)
        self.positions = build_positions(cfg.pos_emb, D, cfg.max_target_positions)
        self.dropout = nn.Dropout(cfg.dropout)

        # --share-layers: one set of weights applied decoder_layers times (Universal Transformer,
        # Dehghani et al. 2019); every application still has its own memory.
        self.num_layers = cfg.decoder_layers
        self.layers = nn.ModuleList(
            [self.build_layer(cfg) for _ in range(1 if cfg.share_layers else cfg.decoder_layers)]
        )
        # --share-layers-timestep-emb: the Universal Transformer's timestep signal (Dehghani et al. 2019,
        # Sec. 2.1, "coordinate embeddings"): a sinusoid of the recurrence step t, added before every step.
        self.timestep_emb = SinusoidalPositions(D) if getattr(cfg, "share_layers_timestep_emb", False) else None
        self.final_norm = nn.LayerNorm(D) if cfg.decoder_normalize_before else None

        self.adaptive_softmax = None
        self.output_projection = None
        if cfg.adaptive_softmax_cutoff is not None:
            self.adaptive_softmax = AdaptiveSoftmax(
                V, D, options.eval_str_list(cfg.adaptive_softmax_cutoff, type=int),
                cfg.adaptive_softmax_dropout, factor=cfg.adaptive_softmax_factor,
                adaptive_inputs=self.embed_tokens if cfg.tie_adaptive_weights else None,
                tie_proj=cfg.tie_adaptive_proj,
            )  # fmt: skip
        else:
            self.output_projection = nn.Linear(D, V, bias=False)
            if cfg.share_decoder_input_output_embed:
                self.output_projection.weight = self.embed_tokens.weight
            else:
                nn.init.normal_(self.output_projection.weight, std=D**-0.5)

        for layer in self.layers[1:]:
            layer.attn.share_with(self.layers[0].attn)  # e.g. Transformer-XL's global position biases

        self.init_stream_state()
        self._warned_no_streams = False
        # How a sequence outside a stream is read with --mem-len: alone (default; e.g. context_eval's windows,
        # language_modeling batches), or in segments of the training length with the memory (the hub).
        self.read_in_segments = False
        self.segment_len = getattr(cfg, "tokens_per_sample", None)

    @staticmethod
    def build_layer(cfg) -> DecoderLayer:
        D = cfg.decoder_embed_dim
        attention = build_attention(cfg.attention, D, cfg.decoder_attention_heads, cfg.attention_dropout, cfg)
        ffn = None
        if cfg.decoder_ffn_embed_dim > 0:
            ffn = FeedForward(
                D, cfg.decoder_ffn_embed_dim, cfg.activation_fn, cfg.activation_dropout, chunks=cfg.ffn_chunks
            )
        return DecoderLayer(attention, ffn, D, cfg.dropout, cfg.decoder_normalize_before)

    # ---- state kept between calls: reset_memory, get/set_extra_state come from StreamStateMixin --------
    @property
    def carries_state(self) -> bool:
        return self.mem_len > 0

    def reorder_incremental_state(self, incremental_state, new_order: Tensor) -> None:
        state = self.get_incremental_state(incremental_state, "state")
        if state is None:
            return
        # fairseq's generator reorders after every step, mostly with the identity (sampling, beam 1, no
        # finished hypothesis): skip copying every cached key and value then.
        if new_order.numel() == state.batch_size and torch.equal(
            new_order, torch.arange(new_order.numel(), device=new_order.device)
        ):
            return
        self.set_incremental_state(incremental_state, "state", state.index_select(new_order))

    def max_positions(self) -> int:
        return getattr(self.positions, "max_positions", UNBOUNDED_POSITIONS)

    # ---- forward -------------------------------------------------------------------------------
    def forward(
        self, prev_output_tokens: Tensor, src_lengths=None, encoder_out=None, incremental_state=None,
        features_only: bool = False, stream_offset: Optional[int] = None, **unused,
    ):  # fmt: skip
        """``stream_offset`` (from ``segment_lm``): position of this segment in its streams; the memory
        is used only if it was left by the segment that ends exactly there."""
        x, extra = self.extract_features(prev_output_tokens, incremental_state, stream_offset)
        if not features_only:
            x = self.output_layer(x)
        return x, extra

    def extract_features(self, tokens: Tensor, incremental_state=None, stream_offset: Optional[int] = None, **unused):
        if incremental_state is not None:
            # Generation: consume only the tokens not seen yet; keep all the past unless the model was
            # trained with a bounded memory.
            state = self.get_incremental_state(incremental_state, "state")
            tokens = tokens[:, (0 if state is None else state.position) :]
            x, state, aux = self.run(tokens, state, keep=self.mem_len or None)
            self.set_incremental_state(incremental_state, "state", state)
        elif self.mem_len > 0 and stream_offset is not None:
            # Contiguous streams (segment_lm): continue from the previous segment of the same streams.
            # The memory is valid only where it ended: a new epoch or pass (offset 0), another stream
            # layout or a skipped segment start afresh, and a resumed run continues exactly.
            state = self.previous_stream_state(tokens, stream_offset)
            x, state, aux = self.run(tokens, state, keep=self.mem_len, start=stream_offset)
            self.keep_stream_state(state)
        elif self.mem_len > 0 and self.read_in_segments:
            x, aux = self.run_in_segments(tokens)
        else:
            if self.mem_len > 0 and not self._warned_no_streams:
                logger.warning("--mem-len needs --task segment_lm (ordered streams): batches run without memory")
                self._warned_no_streams = True
            x, _, aux = self.run(tokens, None, keep=0)
        return x, {"attn": [None], "aux_losses": aux}

    def run_in_segments(self, tokens: Tensor):
        """``read_in_segments`` (set by ``EfficientLM.from_pretrained``, for the hub's ``score``): a sequence
        longer than --tokens-per-sample is read as segment_lm reads a stream, in segments of that length from
        position 0, each with the (detached) memory of the ones before; so a text scored at once gets the
        same numbers as fairseq-eval-lm --batch-size 1 on it. Nothing is kept after the call."""
        T = self.segment_len
        if not T or tokens.size(1) <= T:
            x, _, aux = self.run(tokens, None, keep=0)
            return x, aux
        features, terms, state = [], [], None
        for start in range(0, tokens.size(1), T):
            x, state, aux = self.run(tokens[:, start : start + T], state, keep=self.mem_len, start=start)
            state = state.detach()  # truncated BPTT, as between the batches of segment_lm
            features.append(x)  # B x t x D
            terms.append((aux, x.size(1)))
        n = tokens.size(1)
        aux = {  # per-token means: the length-weighted mean over the segments
            name: AuxLoss(sum(a[name].value * t for a, t in terms if name in a) / n, term.weight)
            for name, term in terms[0][0].items()
        }
        return torch.cat(features, dim=1), aux  # B x N x D

    def run(self, tokens: Tensor, state: Optional[DecoderState], keep: Optional[int], start: Optional[int] = None):
        """Embed ``tokens`` (B x T), run every layer with its memory; return B x T x D features, the next
        state and the auxiliary losses. ``start``: position of the first token (default: after ``state``)."""
        B, T = tokens.shape
        if start is None:
            start = 0 if state is None else state.position
        x = self.embed_scale * self.embed_tokens(tokens)  # B x T x D
        dtype = x.dtype  # the model's dtype (float32, or half/bf16 under --fp16/--bf16, float64 in tests)
        if self.positions is not None:
            x = x + self.positions(torch.arange(start, start + T, device=tokens.device)).to(dtype)
        x = self.dropout(x)

        past = [None] * self.num_layers if state is None else state.layers
        layers = [self.layers[i % len(self.layers)] for i in range(self.num_layers)]
        new_layers, aux = [], {}
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
            if self.reversible:  # --reversible: the layers as reversible couplings (modules/reversible.py)
                x, new_layers = reversible_layers(layers, x, past, keep)
            for i, layer in enumerate(layers):
                if not self.reversible:
                    if self.timestep_emb is not None:  # Universal Transformer: the step's signal, 1 x D
                        x = x + self.timestep_emb(torch.tensor([i], device=x.device)).to(x.dtype)
                    x, mem = layer(x, past[i], keep)
                    new_layers.append(mem)
                for name, term in layer.attn.aux_losses(new_layers[i]).items():
                    aux[name] = term if name not in aux else AuxLoss(aux[name].value + term.value, term.weight)
            if self.final_norm is not None:
                x = self.final_norm(x)
        return x.to(dtype), DecoderState(new_layers, start + T), aux

    def output_layer(self, features: Tensor) -> Tensor:
        if self.adaptive_softmax is not None:
            return features  # the adaptive softmax is applied by get_normalized_probs / the criterion
        return self.output_projection(features)  # B x T x V
