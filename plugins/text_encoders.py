"""Text in, text out for character- and byte-level data: fairseq ``--bpe char_level`` / ``--bpe byte_level``.

A character or byte model's dictionary holds the symbols ``preprocess/`` wrote, not text (see
:mod:`preprocess.common`): characters are tokens, a space is ``_``, ``_`` and other whitespace are
``U+XXXX``; bytes are their decimal values; in both the newline is ``</s>``. fairseq's own ``characters``
and ``bytes`` encoders write other symbols (``▁`` for a space, Latin-1 look-alikes for bytes), so a
prompt encoded by them would be ``<unk>`` here. These two write exactly the symbols of the data:

    encode("the company\\n") == "t h e _ c o m p a n y </s>"            (char_level)
    encode("the é")          == "116 104 101 32 195 169"              (byte_level)

and ``decode`` inverts them: ``decode(encode(text)) == text`` for any text (bytes: any UTF-8 text; a
sampled byte sequence that is not valid UTF-8 decodes with U+FFFD where it breaks). Symbols that are no
text (``<unk>``, ``madeupword0000``) are kept as they are, so nothing is dropped silently.

``preprocess/`` records the encoder of the data in ``metadata.json`` (``"encoder": "char_level"``) and the
``segment_lm`` task builds it when no ``--bpe`` is given (``fairseq-interactive``, the hub's ``sample``).
"""

import re
from dataclasses import dataclass

from fairseq.data.encoders import register_bpe
from fairseq.dataclass import FairseqDataclass

from preprocess.common import char_line

EOS = "</s>"  # the newline: fairseq-preprocess ends a line with it
_ESCAPED = re.compile(r"U\+([0-9A-F]{4,6})")  # char_token()'s escape of "_" and whitespace


class _LevelEncoder:
    """fairseq's BPE interface: ``encode(text) -> symbols`` and ``decode(symbols) -> text``, where
    ``symbols`` is the space-separated string a fairseq ``Dictionary`` reads (``encode_line``) and
    writes (``string``)."""

    def __init__(self, *unused):
        pass

    @staticmethod
    def add_args(parser):
        pass


@dataclass
class CharLevelConfig(FairseqDataclass):
    """No options (a registered config lets hydra compose ``--bpe char_level`` given on the command line)."""


@dataclass
class ByteLevelConfig(FairseqDataclass):
    """No options."""


@register_bpe("char_level", dataclass=CharLevelConfig)
class CharLevelEncoder(_LevelEncoder):
    """Text <-> the symbols of ``python -m preprocess.text --level char`` (and ``preprocess.text8``)."""

    @staticmethod
    def encode(x: str) -> str:
        tokens = []
        for i, line in enumerate(x.split("\n")):
            if i:
                tokens.append(EOS)
            if line:
                tokens.append(char_line(line))
        return " ".join(tokens)

    @staticmethod
    def decode(x: str) -> str:
        return "".join(_char_text(token) for token in x.split())


def _char_text(token: str) -> str:
    if token == "_":
        return " "
    if token == EOS:
        return "\n"
    escaped = _ESCAPED.fullmatch(token)
    return chr(int(escaped[1], 16)) if escaped else token


_BYTE_SYMBOL = [str(b) for b in range(256)]
_BYTE_SYMBOL[10] = EOS


@register_bpe("byte_level", dataclass=ByteLevelConfig)
class ByteLevelEncoder(_LevelEncoder):
    """Text (UTF-8) <-> the symbols of ``preprocess.text --level byte`` and ``preprocess.enwik8``."""

    @staticmethod
    def encode(x: str) -> str:
        return " ".join([_BYTE_SYMBOL[b] for b in x.encode("utf-8")])

    @staticmethod
    def decode(x: str) -> str:
        out = bytearray()
        for token in x.split():
            if token == EOS:
                out.append(10)
            elif token.isascii() and token.isdigit() and int(token) < 256:
                out.append(int(token))
            else:  # <unk>, <s>, ...: not a byte; kept visible
                out += token.encode("utf-8")
        return out.decode("utf-8", errors="replace")
