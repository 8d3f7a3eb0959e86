"""Inputs of the fused-linear loss from a real model at the start of unlearning.

``lm_head_case`` runs a pretrained model (e.g. SmolLM2-135M: lm_head V = 49152, H = 576) on a
few real question/answer pairs, strengthens a copy on them for a few optimizer steps, and
returns what ``rkld_kernels.fused_linear_rkl_loss`` receives when unlearning starts: the final
hidden states at the answer positions of the original model (which is also the student) and of
the strengthened model, their lm_head weights, and the answer tokens. The precision tests and
the kernel benchmarks use it beside their synthetic shapes.
"""
from __future__ import annotations

import copy

import torch


def lm_head_case(model_ref, rows: list, strengthen_steps: int = 2, lr: float = 5e-5,
                 max_length: int = 160, seed: int = 0) -> dict:
    """``{"student_hidden", "student_weight", "original_hidden", "original_weight",
    "strengthened_hidden", "strengthened_weight"}`` (float32, detached; the student equals the
    original) and ``"targets"`` (the answer tokens those rows predict), from ``rows``
    (``question`` / ``answer`` dicts) and the model ``model_ref`` (anything ``load_model``
    takes). The strengthened model is the original after ``strengthen_steps`` AdamW steps of
    answer NLL on the same rows."""
    from .data import collate, encode_qa
    from .models import final_hidden, load_model, output_head, supervised_positions

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, tokenizer = load_model(model_ref, dtype=torch.float32)
        batch = collate([encode_qa(tokenizer, r["question"], r["answer"], max_length)
                         for r in rows], tokenizer.pad_token_id)
        strengthened = copy.deepcopy(model)
        strengthened.train()
        optimizer = torch.optim.AdamW(strengthened.parameters(), lr=lr)
        for _ in range(strengthen_steps):
            strengthened(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        case = {}
        with torch.no_grad():
            for name, m in (("original", model), ("strengthened", strengthened)):
                m.eval()
                hidden = final_hidden(m, batch["input_ids"], batch["attention_mask"])
                case[f"{name}_hidden"], targets = supervised_positions(hidden, batch["labels"])
                case[f"{name}_weight"] = output_head(m)[0].detach().clone()
    case["student_hidden"] = case["original_hidden"].clone()
    case["student_weight"] = case["original_weight"].clone()
    case["targets"] = targets
    return case
