"""The TOFU evaluation's model passes, each prompt run once (``EvalConfig.engine="cached"``).

Every evaluation question is scored with several answers (the answer, a paraphrase, three to
five perturbed ones) and is also the prompt of a greedy generation, and every one of those
sequences starts with the same prompt tokens (``rkld.data.encode_qa`` is ``encode_prompt`` +
answer + EOS). So the prompts of a group of questions run once, left-padded, with the KV cache
kept:

- likelihood: the answers run on a copy of their question's cache rows (right-padded, grouped
  by length), and the lm_head projects only the positions that predict an answer token: the
  prompt's last position (kept from the prompt pass) and the answer's own positions but the
  last. avgNLL = mean NLL of the answer tokens (EOS counted), in float32;
- generation: greedy decoding continues from the same cache (the prompt pass's last logits are
  the first step), one token per step for the rows still running; a row leaves the batch, and
  its cache rows are dropped, as soon as it emits a stop token.

Positions are ``cumsum(attention_mask) - 1``, so a padded row sees exactly the positions, keys
and values of the same sequence run alone: the numbers are those of one sequence at a time up to
floating-point summation order, and generations are identical (barring exact ties of logits).

Public API:
    question_groups(prompts, size) -> [[question indices]]   by prompt length, longest first
    cached_eval_passes(model, prompts, answers, *, batch_size, question_batch_size, pad_id,
                       stop_ids, max_new_tokens, max_length, generate, progress)
        -> (avg_nlls per answer, generated token lists per prompt or None)
"""
from __future__ import annotations

import warnings

import torch

from .models import capture_final_hidden, output_head

# Rows of hidden states projected to the vocabulary at once for the answers' NLL.
_NLL_CHUNK = 1024


def question_groups(prompts: list, size: int) -> list:
    """Question indices grouped ``size`` at a time, by prompt length (longest first, ties in
    input order), so that left padding stays short."""
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    return [order[start:start + size] for start in range(0, len(order), size)]


def _left_padded(sequences: list, pad_id: int):
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


def _right_padded(sequences: list, pad_id: int):
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids, mask


def _cache_rows(cache, rows: torch.Tensor):
    """A new DynamicCache holding ``rows`` (a batch index, repeats allowed) of ``cache``; the
    original is left untouched, so it serves the next group of answers and generation."""
    from transformers import DynamicCache
    layers = [(layer.keys.index_select(0, rows), layer.values.index_select(0, rows))
              for layer in cache.layers]
    return DynamicCache(ddp_cache_data=layers)


def _forward(model, input_ids, attention_mask, cache, positions):
    """One forward with the cache; returns (final hidden [B, T, H], logits of the last
    position [B, V], the updated cache)."""
    with capture_final_hidden(model) as captured, warnings.catch_warnings():
        # transformers 5.x renames the argument (`cache`); the old name works in every release
        # the package supports (>= 4.56), so its deprecation notice is silenced here.
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated",
                                category=FutureWarning)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                    past_key_values=cache, use_cache=True)
    return captured[0], out.logits[:, -1], out.past_key_values


def _answer_nlls(weight, bias, rows_hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL of ``targets`` [n] under ``lm_head(rows_hidden)`` [n, H], float32, in chunks."""
    out = []
    for start in range(0, rows_hidden.shape[0], _NLL_CHUNK):
        h = rows_hidden[start:start + _NLL_CHUNK]
        logits = torch.nn.functional.linear(h.float(), weight.float(),
                                            None if bias is None else bias.float())
        out.append(torch.nn.functional.cross_entropy(
            logits, targets[start:start + _NLL_CHUNK], reduction="none"))
    return torch.cat(out) if out else rows_hidden.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def cached_eval_passes(model, prompts: list, answers: list, *, batch_size: int,
                       question_batch_size: int, pad_id: int, stop_ids: list,
                       max_new_tokens: int, max_length: int, generate: bool = True,
                       progress=None, rank: int = 0, world: int = 1):
    """avgNLL of every answer and greedy generations of every prompt, each prompt run once.

    ``prompts``: token lists, one per question. ``answers``: ``(question index, answer tokens
    with EOS)`` pairs; an answer is cut so that prompt + answer fit ``max_length`` (as
    ``encode_qa`` cuts). ``progress``: a callable ``(n_done_questions)`` or None. Returns
    ``(nlls, generations)``: a float per answer, and per prompt the generated token ids up to
    (without) the first stop token, or None when ``generate`` is False. With ``world`` > 1
    (several processes, each holding the whole model), question group g runs on process
    g mod world and the others' entries stay None: the groups are formed globally, so every
    value is computed exactly as in one process.
    """
    device = next(model.parameters()).device
    weight, bias = output_head(model)
    by_question: dict = {}
    for k, (question, tokens) in enumerate(answers):
        keep = max_length - len(prompts[question])
        if keep < 1:
            raise ValueError(f"answer {k}: the prompt fills max_length={max_length} tokens and "
                             f"leaves no answer token to score; raise max_length")
        by_question.setdefault(question, []).append((k, list(tokens[:keep])))
    nlls = [None] * len(answers)
    generations = [None] * len(prompts) if generate else None
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done = 0
    for group in question_groups(prompts, question_batch_size)[rank::world]:
        ids, mask = _left_padded([prompts[q] for q in group], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden, first_logits, cache = _forward(model, ids, mask, None, positions)
        last_hidden = hidden[:, -1]                       # predicts each answer's first token
        lengths = mask.sum(-1)

        # Likelihood: the group's answers, by length, batch_size rows per pass.
        items = [(row, k, tokens) for row, q in enumerate(group)
                 for k, tokens in by_question.get(q, [])]
        items.sort(key=lambda item: (-len(item[2]), item[1]))
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            rows = torch.tensor([row for row, _, _ in chunk], device=device)
            a_ids, a_mask = _right_padded([tokens for _, _, tokens in chunk], pad_id)
            a_ids, a_mask = a_ids.to(device), a_mask.to(device)
            full_mask = torch.cat([mask.index_select(0, rows), a_mask], dim=1)
            a_pos = lengths.index_select(0, rows)[:, None] + torch.arange(
                a_ids.shape[1], device=device)
            a_hidden = hidden.new_zeros(0)
            if a_ids.shape[1] > 1:     # the last answer token predicts nothing we score
                a_hidden, _, _ = _forward(model, a_ids[:, :-1], full_mask[:, :-1],
                                          _cache_rows(cache, rows), a_pos[:, :-1])
            predicting = torch.cat([last_hidden.index_select(0, rows)[:, None], a_hidden],
                                   dim=1)                 # [n, A, H]: row t predicts token t
            keep = a_mask.bool()
            token_nll = _answer_nlls(weight, bias, predicting[keep], a_ids[keep])
            per_row = torch.zeros(len(chunk), dtype=torch.float32, device=device)
            per_row.index_add_(0, keep.nonzero()[:, 0], token_nll)
            per_row = per_row / keep.sum(-1)
            for (_, k, _), value in zip(chunk, per_row.tolist()):
                nlls[k] = value

        if generate:
            for row, tokens in zip(group, _greedy(model, first_logits, cache, mask, positions,
                                                  stops, max_new_tokens)):
                generations[row] = tokens
        done += len(group)
        if progress is not None:
            progress(done)
    return nlls, generations


def _greedy(model, logits, cache, mask, positions, stops, max_new_tokens: int) -> list:
    """Greedy continuation of a prompt batch from its cache; rows leave when they stop."""
    n = logits.shape[0]
    out = [[] for _ in range(n)]
    active = torch.arange(n, device=logits.device)
    next_pos = positions[:, -1] + 1
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        finished = torch.isin(token, stops)
        for row, t, f in zip(active.tolist(), token.tolist(), finished.tolist()):
            if not f:
                out[row].append(t)
        if step == max_new_tokens - 1:
            break
        keep = (~finished).nonzero()[:, 0]
        if keep.numel() == 0:
            break
        if keep.numel() < active.numel():
            active, token, next_pos = active[keep], token[keep], next_pos[keep]
            mask = mask.index_select(0, keep)
            cache.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        _, logits, cache = _forward(model, token[:, None], mask, cache, next_pos[:, None])
        next_pos = next_pos + 1
    return out
