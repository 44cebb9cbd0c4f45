"""``lstm_stateful`` presets: LSTM baselines at the parameter count of a transformer preset, so that a
comparison changes the architecture and nothing else (counts with tied embeddings, measured by
``python -m recipes.context_length.params``).

The hidden size is chosen so that vocabulary x H + 2 layers x (8 H^2 + 8 H) matches the transformer's
total on the data it is meant for; the LSTM is the standard two-layer, tied-embedding word/char model
(Zaremba et al. 2014; Press & Wolf 2017 for the tying)."""

from fairseq.models import register_model_architecture

from .common import defaults as _defaults


@register_model_architecture("lstm_stateful", "lstm_stateful_tiny")
def lstm_stateful_tiny(args):
    """full_tiny's size on bytes (260 symbols): 2 x 77, 116,116 parameters vs full_tiny's 116,736."""
    _defaults(args, decoder_layers=2, decoder_embed_dim=77, decoder_hidden_size=77, dropout=0.0,
              share_decoder_input_output_embed=True)  # fmt: skip


@register_model_architecture("lstm_stateful", "lstm_stateful_chars")
def lstm_stateful_chars(args):
    """full_small's size on PTB characters (56 symbols): 2 x 222, 804,528 parameters vs full_small's
    800,512 (xl_small: 866,304); dropout 0.1 as full_small."""
    _defaults(args, decoder_layers=2, decoder_embed_dim=222, decoder_hidden_size=222, dropout=0.1,
              share_decoder_input_output_embed=True)  # fmt: skip


@register_model_architecture("lstm_stateful", "lstm_stateful_ptb")
def lstm_stateful_ptb(args):
    """full_ptb's size on PTB words (10,008 symbols): 2 x 362, 5,725,392 parameters vs full_ptb's
    5,721,600 (xl_ptb: 5,984,256); dropout 0.3 as full_ptb (Zaremba et al. 2014's medium model used 0.5
    at 650 units)."""
    _defaults(args, decoder_layers=2, decoder_embed_dim=362, decoder_hidden_size=362, dropout=0.3,
              share_decoder_input_output_embed=True)  # fmt: skip


@register_model_architecture("lstm_stateful", "lstm_stateful_words_small")
def lstm_stateful_words_small(args):
    """full_small's size on PTB words (10,008 symbols; the word-level studies' model, docs/studies/): 2 x 164,
    tied embeddings, 2,074,272 parameters vs full_small's 2,074,368 (its layers: 432,960 against 793,088); dropout
    0.1 as full_small."""
    _defaults(args, decoder_layers=2, decoder_embed_dim=164, decoder_hidden_size=164, dropout=0.1,
              share_decoder_input_output_embed=True)  # fmt: skip


@register_model_architecture("lstm_stateful", "lstm_zaremba_small")
def lstm_zaremba_small(args):
    """Zaremba et al. 2014 (Sec. 4.1), the small non-regularized model: 2 layers x 200 units, embeddings of
    200, untied, no dropout, softmax with a bias, every parameter ~ U(-0.1, 0.1). Published on PTB words:
    120.7 valid / 114.5 test perplexity (13 epochs of SGD; the schedule is in
    recipes/experiments/lstm_zaremba_ptb.yaml). nn.LSTM has two bias vectors per gate where the paper's
    model has one: their sum is the paper's bias, initialised as the sum of two U(-0.1, 0.1)."""
    _defaults(args, decoder_layers=2, decoder_embed_dim=200, decoder_hidden_size=200, dropout=0.0,
              share_decoder_input_output_embed=False, decoder_output_bias=True, init_range=0.1)  # fmt: skip
