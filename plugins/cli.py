"""What the user typed on a ``fairseq-*`` command line, checked before fairseq starts any work.

fairseq fills every option the user did not type with a default, so a task or model cannot tell a typed
``--criterion cross_entropy`` from the default one, and it reports a mistyped ``--arch`` with its whole
registry (4,000 characters) after the parser's usage text. The plugin is imported while fairseq builds
its parser (``--user-dir``), before any of that: :func:`check_command_line` reads ``sys.argv`` there.
Nothing here runs outside a ``fairseq-*`` program (e.g. under pytest or the Python hub).
"""

import argparse
import ast
import difflib
import json
import os
import sys
from typing import List, Optional

from .errors import UserError


def is_fairseq_cli(argv: Optional[List[str]] = None) -> bool:
    argv = sys.argv if argv is None else argv
    return bool(argv) and os.path.basename(argv[0]).startswith("fairseq-")


def typed(option: str, argv: Optional[List[str]] = None) -> bool:
    """Whether ``option`` (e.g. ``--criterion``) is on the command line of a fairseq-* program."""
    argv = sys.argv if argv is None else argv
    return is_fairseq_cli(argv) and any(a == option or a.startswith(option + "=") for a in argv[1:])


def typed_value(option: str, argv: Optional[List[str]] = None, aliases=()) -> Optional[str]:
    """The last value given to ``option`` (``--x V`` or ``--x=V``) on a fairseq-* command line, else None."""
    argv = sys.argv if argv is None else argv
    if not is_fairseq_cli(argv):
        return None
    value = None
    for i, a in enumerate(argv[1:], start=1):
        for name in (option, *aliases):
            if a == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif a.startswith(name + "="):
                value = a[len(name) + 1 :]
    return value


def close_matches(word: str, choices, n: int = 3) -> str:
    """``'a', 'b'`` (the closest choices), or '' when none is close."""
    return ", ".join(difflib.get_close_matches(word, sorted(choices), n=n, cutoff=0.6))


def parse_overrides(text: str, option: str = "--model-overrides") -> dict:
    """A dict of option overrides: a Python literal, as fairseq writes it (``"{'mem_len': 1600}"``), or
    JSON (``'{"mem_len": 1600, "same_length": true}'``); the two agree but for true/false/null."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        try:
            value = json.loads(text)
        except ValueError:
            raise UserError(
                f"{option} {text!r} is not a dict: write a Python or JSON dict such as \"{{'mem_len': 1600}}\""
            ) from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise UserError(f"{option} {text!r} is not a dict of option names: write e.g. \"{{'mem_len': 1600}}\"")
    return value


def check_arch(argv: Optional[List[str]] = None) -> None:
    """A mistyped ``--arch``: one line with the closest names (fairseq prints its whole registry)."""
    from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY

    arch = typed_value("--arch", argv, aliases=("-a",))
    if arch is None or arch in ARCH_MODEL_REGISTRY or arch in MODEL_REGISTRY:
        return
    matches = close_matches(arch, ARCH_MODEL_REGISTRY)
    hint = f"did you mean {matches}?" if matches else "presets are named <mechanism>_<dataset>[_<size>], e.g. xl_tiny"
    raise UserError(f"unknown --arch '{arch}': {hint} (every preset: README, or --arch efficient_lm with options)")


HALF_PRECISION = ("--fp16", "--bf16", "--memory-efficient-bf16")  # --amp, --memory-efficient-fp16 run on CPU


def check_half_precision(argv: Optional[List[str]] = None) -> None:
    """``fairseq-train --fp16`` / ``--bf16`` without a GPU: fairseq fails deep inside with ``AssertionError:
    Torch not compiled with CUDA enabled`` (fp16) or ``'NoneType' object has no attribute 'xla_device'``
    (bf16 and memory-efficient bf16 take the TPU path). One line instead, pointing at the CPU alternative."""
    import torch

    argv = sys.argv if argv is None else argv
    training = os.path.basename(argv[0]).startswith("fairseq-train")  # where fairseq fails (seen); not eval
    typed_flags = [flag for flag in HALF_PRECISION if typed(flag, argv)]
    if not training or not typed_flags or torch.cuda.is_available() or typed("--tpu", argv):
        return
    raise UserError(
        f"{typed_flags[0]} needs a CUDA GPU and this machine has none: on CPU, use --autocast-bf16 (the "
        f"decoder layers in bfloat16 autocast, weights and loss in float32), or drop {typed_flags[0]}"
    )


def check_override_keys(overrides: dict, known, option: str = "--model-overrides") -> None:
    """Refuse override keys that no option has (fairseq would ignore them silently)."""
    for key in overrides:
        if key not in known:
            matches = close_matches(key, known)
            hint = f"did you mean {matches}?" if matches else "use option names with underscores, e.g. mem_len"
            raise UserError(f"{option}: no option named '{key}' in this checkpoint's configuration: {hint}")


def model_overrides(argv: Optional[List[str]] = None) -> Optional[dict]:
    """The ``--model-overrides`` dict typed on a fairseq-* command line, else None."""
    text = typed_value("--model-overrides", argv)
    return None if text is None else parse_overrides(text)


# the parser each fairseq-* program builds before ``options.parse_args_and_arch`` (fairseq_cli/<program>.py)
PARSERS = {
    "fairseq-train": "get_training_parser",
    "fairseq-eval-lm": "get_eval_lm_parser",
    "fairseq-validate": "get_validation_parser",
    "fairseq-generate": "get_generation_parser",
    "fairseq-interactive": "get_interactive_generation_parser",
}


def complete_help(argv: List[str]) -> str:
    """The help of ``argv`` (a fairseq-* command line) with the options of its --arch, --task, --criterion,
    ... that fairseq's own ``--help`` leaves out: ``parse_args_and_arch`` first parses with the bare parser,
    whose argparse help action prints and exits before the model's and task's options are added.
    Here the same function runs without ``--help`` and the parser is printed once it is complete
    (``modify_parser`` is called a second time just after fairseq has added those options)."""
    from fairseq import options

    parser = getattr(options, PARSERS[os.path.basename(argv[0])])()
    parser.prog = os.path.basename(argv[0])
    calls = []

    def print_when_complete(p: argparse.ArgumentParser) -> None:
        calls.append(p)
        if len(calls) == 2:
            raise _Complete(p.format_help())

    try:
        rest = [a for a in argv[1:] if a not in ("-h", "--help")]
        options.parse_args_and_arch(parser, rest, parse_known=True, modify_parser=print_when_complete)
    except _Complete as complete:
        return complete.args[0]
    return parser.format_help()  # not reached: fairseq calls modify_parser twice


class _Complete(Exception):
    pass


def wants_help(argv: List[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv[1:])


def check_generate_task(argv: Optional[List[str]] = None) -> None:
    """fairseq-generate scores a language model's test segments as forced prefixes against a reference and
    prints BLEU4 = 0.00: point to the tools that sample or score a language model."""
    argv = sys.argv if argv is None else argv
    if os.path.basename(argv[0]) == "fairseq-generate" and typed_value("--task", argv) == "segment_lm":
        raise UserError(
            "fairseq-generate is for translation (it scores BLEU against references); for a language model "
            "use fairseq-interactive --task segment_lm --path CKPT (sampling from prompts), the hub "
            "EfficientLM.from_pretrained(...).sample(text) (docs/hub.md), or fairseq-eval-lm for bpc/ppl"
        )


def check_command_line(argv: Optional[List[str]] = None) -> None:
    """Checks of a fairseq-* command line that need nothing but the registries (run at plugin import).
    ``--model-overrides`` given as JSON is rewritten in ``sys.argv`` as the Python literal fairseq evals
    (``true`` -> ``True``), so fairseq-eval-lm and ``recipes.context_eval`` take the same syntax.
    ``--help`` prints the complete help (every model, attention and task option) and exits."""
    argv = sys.argv if argv is None else argv
    if not is_fairseq_cli(argv):
        return
    check_arch(argv)
    check_generate_task(argv)
    if wants_help(argv) and os.path.basename(argv[0]) in PARSERS:
        print(complete_help(argv))
        sys.exit(0)
    check_half_precision(argv)
    overrides = model_overrides(argv)
    if overrides is not None:
        for i, a in enumerate(argv):
            if a == "--model-overrides" and i + 1 < len(argv):
                argv[i + 1] = repr(overrides)
            elif a.startswith("--model-overrides="):
                argv[i] = f"--model-overrides={overrides!r}"
