"""A stopping rule for unlearning that never looks at the retain model.

The retain model's forget-set truth ratios are the test metric (forget quality); choosing an
epoch by them reports the best of several tries on the test set. The rule here uses what an
unlearner has without a retain model: authors that no model was trained on (TOFU's
``holdoutNN`` splits, and the synthetic benchmark's). A model that never saw the forget authors
answers their questions about as well as it answers the held-out authors', so unlearning stops
at the first check where

    mean_i p(a_i | q_i) over the forget questions  <=  the same mean over the held-out questions

with p(a|q) = exp(-avgNLL of the answer tokens), TOFU's length-normalised answer probability.
The forget side is measured on the student being trained; the held-out side once, on the model
unlearning starts from (``start``), because unlearning lowers the student's answer
probabilities everywhere, held-out authors included, and a threshold that falls with the
student would never be met. (Measured on the synthetic benchmark: the original model gives
held-out authors' answers p ~ 0.05, the retain models give the forget authors' p ~ 0.05, while
an RKLD student's held-out probability falls to 0.002.) The student's held-out probability is
recorded beside every check as a diagnostic. The forget questions are ``{forget}_perturbed``'s
question and answer (one row per question; the forget split itself, when the benchmark has no
perturbed split).

Public API:
    HoldoutStop(benchmark, forget_split, tokenizer, max_length, template, batch_size=32)
        ``start(model)`` measures the threshold on the model unlearning starts from;
        ``check(model, step) -> bool`` (True: stop), ``checks`` (every measurement made)
    mean_answer_probability(model, tokenizer, examples, batch_size) -> float
"""
from __future__ import annotations

import torch

from . import metrics
from .data import collate, encode_qa, holdout_split_for


@torch.no_grad()
def mean_answer_probability(model, tokenizer, examples: list, batch_size: int = 32) -> float:
    """Mean over ``examples`` (encoded QA) of exp(-avgNLL of the answer), in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total = 0.0
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], pad)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            nll = metrics.answer_average_nll(logits, batch["labels"])
            total += float(torch.exp(-nll.double()).sum())
    finally:
        model.train(was_training)
    return total / len(examples)


class HoldoutStop:
    """Stop when the forget questions' answer probability reaches the held-out authors'."""

    def __init__(self, benchmark, forget_split: str, tokenizer, max_length: int,
                 template: str = "auto", batch_size: int = 32):
        holdout = holdout_split_for(forget_split)
        if holdout not in benchmark.splits:
            raise ValueError(f"the held-out stopping rule needs split {holdout!r} (authors no "
                             f"model trained on), which benchmark {benchmark.name!r} lacks; "
                             f"available: {', '.join(benchmark.splits)}")
        perturbed = f"{forget_split}_perturbed"
        forget_rows = benchmark.split(perturbed if perturbed in benchmark.splits else forget_split)
        holdout_rows = benchmark.split(holdout)
        if not forget_rows or not holdout_rows:
            raise ValueError(f"the held-out stopping rule needs questions in {forget_split!r} and "
                             f"{holdout!r}; one of them is empty")

        def encode(rows):
            return [encode_qa(tokenizer, r["question"], r["answer"], max_length, template)
                    for r in rows]
        self.forget = encode(forget_rows)
        self.holdout = encode(holdout_rows)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.checks: list = []
        self.threshold = None

    def start(self, model) -> float:
        """The held-out authors' mean answer probability under ``model`` (the original)."""
        self.threshold = mean_answer_probability(model, self.tokenizer, self.holdout,
                                                 self.batch_size)
        return self.threshold

    def check(self, model, step: int) -> bool:
        if self.threshold is None:
            raise RuntimeError("HoldoutStop.start(original model) must run before check")
        forget = mean_answer_probability(model, self.tokenizer, self.forget, self.batch_size)
        holdout = mean_answer_probability(model, self.tokenizer, self.holdout, self.batch_size)
        stop = forget <= self.threshold
        self.checks.append({"step": step, "forget_prob": forget, "threshold": self.threshold,
                            "student_holdout_prob": holdout, "stop": stop})
        return stop
