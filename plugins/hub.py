"""The Python hub interface of ``EfficientLM.from_pretrained``: fairseq's, with text in and text out.

fairseq's ``GeneratorHubInterface`` builds its text encoder from ``cfg.bpe`` only (None for a model trained
without ``--bpe``), so on character or byte data ``sample("the company")`` read two ``<unk>`` words and
returned symbols. Here, with the ``segment_lm`` task:

- the text encoder is the ``bpe=`` given, else the data's own (``metadata.json``: ``char_level`` /
  ``byte_level``, ``plugins/text_encoders.py``), built by the task as ``fairseq-interactive`` builds it;
- a prompt symbol that is not in the dictionary is named in a warning (``SegmentLMTask.encode_prompt``);
- a newline inside a sample or a scored text stays a newline (the data's ``</s>``);
- ``sample`` refuses a prompt with a newline inside: fairseq's generator stops at the prompt's first
  ``</s>`` and would return only the first line. ``score`` takes any text.
"""

import torch
from fairseq.hub_utils import GeneratorHubInterface

from .errors import UserError


class EfficientLMHub(GeneratorHubInterface):
    def __init__(self, cfg, task, models):
        super().__init__(cfg, task, models)
        if self.bpe is None:  # no bpe= given: the task's (segment_lm: the data's text encoder)
            self.bpe = task.build_bpe(cfg.bpe)

    def binarize(self, sentence: str) -> torch.LongTensor:
        if hasattr(self.task, "encode_prompt"):
            return self.task.encode_prompt(sentence)
        return super().binarize(sentence)

    def string(self, tokens: torch.LongTensor) -> str:
        if hasattr(self.task, "symbols_of"):
            return self.task.symbols_of(tokens)
        return super().string(tokens)

    def generate(self, tokenized_sentences, beam: int = 5, verbose: bool = False, skip_invalid_size_inputs=False,
                 inference_step_args=None, prefix_allowed_tokens_fn=None, **kwargs):  # fmt: skip
        if not kwargs.get("score_reference", False):
            eos = self.src_dict.eos()
            rows = tokenized_sentences
            if torch.is_tensor(rows) and rows.dim() == 1:
                rows = rows.unsqueeze(0)
            for tokens in rows:
                if bool((tokens[:-1] == eos).any()):  # the last one is encode_line's own
                    raise UserError(
                        "a prompt to sample from has a newline (</s>) inside: fairseq's generator stops there "
                        "and would continue nothing; pass one line (e.g. the last), or use score() for a text"
                    )
        return super().generate(tokenized_sentences, beam, verbose, skip_invalid_size_inputs,
                                inference_step_args, prefix_allowed_tokens_fn, **kwargs)  # fmt: skip
