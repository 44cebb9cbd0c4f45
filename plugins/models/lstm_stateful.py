"""``lstm_stateful``: an LSTM language model that carries its state (h, c) across the segments of a stream.

fairseq's ``lstm_lm`` starts every batch from a zero state, so on ``segment_lm`` streams it sees only the
current segment, while Transformer-XL sees the previous ones through its memory. This model carries
(h, c) from segment to segment exactly as ``EfficientDecoder`` carries its memory (``StreamStateMixin``:
keyed by ``stream_offset``, one state per mode, detached at segment boundaries: truncated BPTT as in
Zaremba et al. 2014 and Merity et al. 2018; reset at validation start; the training state saved in
checkpoints), which makes the comparison fair: both see the past through state.

    e_t = Drop(E[x_t]);  (h_t, c_t) = LSTM(e_t, (h_(t-1), c_(t-1)));  p(x_(t+1)) = softmax(W Drop(h_t))

(Hochreiter & Schmidhuber 1997; the gates are ``torch.nn.LSTM``'s.) With ``--share-decoder-input-output-embed``
W = E (Press & Wolf 2017, Inan et al. 2017); a hidden size other than the embedding size then adds a
linear projection H -> E.

Shape legend: B = batch (streams), T = segment length, L = layers, E = embedding dim, H = hidden size.
"""

from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import FairseqDataclass
from fairseq.models import FairseqIncrementalDecoder, FairseqLanguageModel, register_model
from omegaconf import II
from torch import Tensor, nn

from ..errors import UserError
from ..memory import TensorState
from .config_defaults import fill_missing_options
from .stream_state import StreamStateMixin

UNBOUNDED_POSITIONS = 1 << 20  # no positional table: any length


@dataclass
class LSTMState(TensorState):
    """The LSTM's recurrent state after ``position`` tokens of a stream (batch first, unlike nn.LSTM)."""

    h: Tensor  # B x L x H
    c: Tensor  # B x L x H
    position: int = 0

    def as_lstm_input(self):
        return self.h.transpose(0, 1).contiguous(), self.c.transpose(0, 1).contiguous()  # L x B x H each


@dataclass
class LSTMStatefulConfig(FairseqDataclass):
    decoder_embed_dim: int = field(default=256, metadata={"help": "token embedding dimension"})
    decoder_hidden_size: int = field(default=256, metadata={"help": "LSTM hidden size"})
    decoder_layers: int = field(default=2, metadata={"help": "stacked LSTM layers"})
    dropout: float = field(
        default=0.1, metadata={"help": "dropout on the embeddings, between LSTM layers and on the LSTM output"}
    )
    share_decoder_input_output_embed: bool = field(
        default=False, metadata={"help": "tie input embedding and output projection (Press & Wolf 2017)"}
    )
    decoder_output_bias: bool = field(
        default=False, metadata={"help": "a bias in the output (softmax) layer, as Zaremba et al. 2014's model"}
    )
    init_range: float = field(
        default=0.0,
        metadata={"help": "if > 0, initialise every parameter uniformly in [-r, r] (Zaremba et al. 2014, "
                  "Sec. 4: 0.1 for the small and medium models); 0 keeps the default initialisation"},
    )  # fmt: skip
    reset_state_every_segment: bool = field(
        default=False,
        metadata={"help": "start every segment from a zero state, as fairseq's lstm_lm does (ablation of the "
                  "state carried across segments)"},
    )  # fmt: skip
    tokens_per_sample: int = II("task.tokens_per_sample")
    max_target_positions: Optional[int] = II("task.max_target_positions")


class StatefulLSTMDecoder(StreamStateMixin, FairseqIncrementalDecoder):
    stream_state_type = LSTMState

    def __init__(self, cfg, dictionary):
        super().__init__(dictionary)
        E, H, V = cfg.decoder_embed_dim, cfg.decoder_hidden_size, len(dictionary)
        self.padding_idx = dictionary.pad()
        self.reset_every_segment = cfg.reset_state_every_segment
        self.embed_tokens = nn.Embedding(V, E, padding_idx=self.padding_idx)
        # N(0, 1/E) as efficient_lm's embeddings: with tied weights, Zaremba et al.'s U(-0.1, 0.1) kept a
        # small char model on the unigram plateau longer (2 x 77 on PTB chars, Adam 0.002, 150 updates:
        # 4.26 bpc with U(-0.1, 0.1), 3.65 with N(0, 1/E))
        nn.init.normal_(self.embed_tokens.weight, std=E**-0.5)
        nn.init.zeros_(self.embed_tokens.weight[self.padding_idx])
        self.dropout = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(E, H, num_layers=cfg.decoder_layers, batch_first=True,
                            dropout=cfg.dropout if cfg.decoder_layers > 1 else 0.0)  # fmt: skip
        tied = cfg.share_decoder_input_output_embed
        self.project_hidden = nn.Linear(H, E, bias=False) if tied and H != E else None
        self.output_projection = nn.Linear(E if tied else H, V, bias=cfg.decoder_output_bias)
        if tied:
            self.output_projection.weight = self.embed_tokens.weight
        if cfg.init_range > 0:  # Zaremba et al. 2014: every weight and bias ~ U(-r, r), the padding row too
            for parameter in self.parameters():
                nn.init.uniform_(parameter, -cfg.init_range, cfg.init_range)
        self.adaptive_softmax = None  # read by the criterion and get_normalized_probs
        self.init_stream_state()

    @property
    def carries_state(self) -> bool:
        return not self.reset_every_segment

    def max_positions(self) -> int:
        return UNBOUNDED_POSITIONS

    def reorder_incremental_state(self, incremental_state, new_order: Tensor) -> None:
        state = self.get_incremental_state(incremental_state, "state")
        if state is not None:
            self.set_incremental_state(incremental_state, "state", state.index_select(new_order))

    def forward(
        self, prev_output_tokens: Tensor, src_lengths=None, encoder_out=None, incremental_state=None,
        features_only: bool = False, stream_offset: Optional[int] = None, **unused,
    ):  # fmt: skip
        """``stream_offset`` (from ``segment_lm``): position of this segment in its streams; the state is
        carried over only if it was left by the segment that ends exactly there."""
        x, extra = self.extract_features(prev_output_tokens, incremental_state, stream_offset)
        if not features_only:
            x = self.output_layer(x)
        return x, extra

    def extract_features(self, tokens: Tensor, incremental_state=None, stream_offset: Optional[int] = None, **unused):
        if incremental_state is not None:  # generation: consume only the tokens not seen yet
            state = self.get_incremental_state(incremental_state, "state")
            tokens = tokens[:, (0 if state is None else state.position) :]
            x, state = self.run(tokens, state)
            self.set_incremental_state(incremental_state, "state", state)
        elif stream_offset is not None and self.carries_state:  # segment_lm: continue the streams
            state = self.previous_stream_state(tokens, stream_offset)
            x, state = self.run(tokens, state, start=stream_offset)
            self.keep_stream_state(state)
        else:
            x, _ = self.run(tokens, None)
        return x, {"attn": [None], "aux_losses": {}}

    def run(self, tokens: Tensor, state: Optional[LSTMState], start: Optional[int] = None):
        """B x T tokens from ``state`` (None: zeros) -> B x T x E features and the next state."""
        if start is None:
            start = 0 if state is None else state.position
        x = self.dropout(self.embed_tokens(tokens))  # B x T x E
        x, (h, c) = self.lstm(x, None if state is None else state.as_lstm_input())  # B x T x H; L x B x H
        x = self.dropout(x)
        if self.project_hidden is not None:
            x = self.project_hidden(x)  # B x T x E
        return x, LSTMState(h.transpose(0, 1), c.transpose(0, 1), start + tokens.size(1))

    def output_layer(self, features: Tensor) -> Tensor:
        return self.output_projection(features)  # B x T x V


@register_model("lstm_stateful", dataclass=LSTMStatefulConfig)
class StatefulLSTMLM(FairseqLanguageModel):
    @classmethod
    def build_model(cls, cfg, task):
        fill_missing_options(cfg, LSTMStatefulConfig)  # a checkpoint saved before an option existed
        if getattr(cfg, "max_target_positions", None) is None:
            cfg.max_target_positions = cfg.tokens_per_sample
        if cfg.init_range < 0:
            raise UserError(f"--init-range must be >= 0 (0 keeps the default initialisation), got {cfg.init_range}")
        for name in ("decoder_embed_dim", "decoder_hidden_size", "decoder_layers"):
            if getattr(cfg, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
        return cls(StatefulLSTMDecoder(cfg, task.target_dictionary))

    def reset_memory(self, mode: Optional[str] = None) -> None:
        self.decoder.reset_memory(mode)

    def aux_losses(self, net_output):
        return {}
