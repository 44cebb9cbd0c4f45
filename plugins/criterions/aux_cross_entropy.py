"""``aux_cross_entropy``: token cross entropy plus every auxiliary loss the model returns.

    loss = sum_t -log p(x_t | x_<t)  +  sample_size * sum_k w_k * aux_k

where ``aux_k`` (a per-token mean, e.g. a compression reconstruction loss or a span penalty) and its
weight ``w_k`` come from ``model.aux_losses(net_output)``, in training. In evaluation (``model.eval()``:
fairseq-train's validation) ``loss`` is the cross entropy alone: the auxiliary terms are training devices
(the compression network's objective, a span regulariser), not part of the language model's likelihood,
and fairseq picks ``checkpoint_best.pt`` by the validation ``loss`` (``--best-checkpoint-metric``'s
default); with them added, the best checkpoint of a compressive or adaptive-span model would be the one with
the smallest sum. They are still logged on their own in validation. Every term is logged on its own, and so is
every number of ``model.metrics()`` in training (e.g. adaptive span's learned spans, per layer). Losses
are logged in base 2, as fairseq does, and the derived metric is labelled by the data's unit:
``bpb`` (bytes, e.g. enwik8), ``bpc`` (characters, e.g. text8) or ``ppl`` (words and subwords).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from omegaconf import II

UNIT_METRIC = {"byte": "bpb", "char": "bpc", "word": "ppl", "subword": "ppl"}


@dataclass
class AuxCrossEntropyConfig(FairseqDataclass):
    sentence_avg: bool = II("optimization.sentence_avg")


def check_finite(nll, aux_losses) -> None:
    """Name the auxiliary term that made the loss NaN/inf. Without this, fairseq sees only the total:
    with finite gradients an inf loss is logged and training goes on; with NaN/inf gradients it stops
    with "gradients are Nan/Inf" (fp32) or keeps lowering the fp16 loss scale, never naming the term."""
    bad = [
        f"'{name}' = {float(term.value.detach().sum())}"
        for name, term in aux_losses.items()
        if not torch.isfinite(term.value).all()
    ]
    if bad:
        raise FloatingPointError(
            f"auxiliary loss {', '.join(bad)} (summed over layers) is not finite "
            f"(cross entropy = {float(nll.detach())}): check that mechanism's loss and its inputs"
        )


@register_criterion("aux_cross_entropy", dataclass=AuxCrossEntropyConfig)
class AuxCrossEntropyCriterion(FairseqCriterion):
    def __init__(self, task, sentence_avg):
        super().__init__(task)
        self.sentence_avg = sentence_avg
        self.unit = getattr(task, "token_unit", "word")  # fairseq's own LM tasks: words (ppl)

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        target = model.get_targets(sample, net_output)  # B x T
        nll = self.nll_loss(model, net_output, target)  # summed over tokens, nats
        ntokens = sample["ntokens"]
        sample_size = sample["target"].size(0) if self.sentence_avg else ntokens
        loss = nll
        logging_output = {
            "nll_loss": nll.data,
            "ntokens": ntokens,
            f"{self.unit}_tokens": ntokens,  # which metric to derive; summable across workers
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        aux_losses = model.aux_losses(net_output) if hasattr(model, "aux_losses") else {}
        for name, term in aux_losses.items():
            if model.training:  # validation's loss is the cross entropy alone (docstring)
                loss = loss + term.weight * term.value * sample_size
            logging_output[f"aux_{name}"] = term.value.data * sample_size
        if aux_losses and not torch.isfinite(loss.detach()).all():
            check_finite(nll, aux_losses)
        logging_output["loss"] = loss.data
        if model.training and hasattr(model, "metrics"):  # e.g. learned spans; weighted so workers average
            for name, value in model.metrics().items():
                logging_output[f"stat_{name}"] = value * sample_size
        return loss, sample_size, logging_output

    def nll_loss(self, model, net_output, target):
        pad = self.padding_idx
        adaptive_softmax = getattr(model.decoder, "adaptive_softmax", None)
        if adaptive_softmax is not None:  # Grave et al. 2017: head + tail clusters, never the full V
            logits, targets = adaptive_softmax(net_output[0], target.reshape(-1))
            # pad only occurs in the head; in a tail, class ``pad`` is the word cutoff[i] + pad, a real word
            return sum(
                F.cross_entropy(lg.float(), tg, ignore_index=pad if i == 0 else -100, reduction="sum")
                for i, (lg, tg) in enumerate(zip(logits, targets))
                if lg is not None
            )
        logits = net_output[0]  # B x T x V
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1), ignore_index=pad, reduction="sum"
        )

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        sample_size, ntokens = total("sample_size"), total("ntokens")
        ln2 = math.log(2)
        metrics.log_scalar("loss", total("loss") / sample_size / ln2, sample_size, round=3)
        metrics.log_scalar("nll_loss", total("nll_loss") / ntokens / ln2, ntokens, round=3)
        for key in sorted({k for log in logging_outputs for k in log if k.startswith("aux_")}):
            metrics.log_scalar(key, total(key) / sample_size, sample_size, round=4)
        for key in sorted({k for log in logging_outputs for k in log if k.startswith("stat_")}):
            metrics.log_scalar(key[len("stat_") :], total(key) / sample_size, sample_size, round=1)
        for unit, metric in UNIT_METRIC.items():
            if total(f"{unit}_tokens") > 0:
                if metric == "ppl":
                    metrics.log_derived("ppl", lambda m: utils.get_perplexity(m["nll_loss"].avg, base=2))
                else:  # the base-2 loss per byte/char is the metric itself
                    metrics.log_derived(metric, lambda m: round(float(m["nll_loss"].avg), 4))
                break

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
