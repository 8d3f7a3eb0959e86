"""Packed documents: several documents in one sequence, none attending to another.

A long-document run fills each sequence of ``max_tokens`` with whole blocks of documents
instead of padding short ones. Packing must not change what the model computes for a token:
its logits may depend only on the earlier tokens of its own document. Two things make that so:

- ``position_ids`` restart at 0 at every document (rotary positions as if the document were
  alone), and the first token of every document after the first is not a next-token target
  (the last token of the previous document must not be trained to predict it);
- attention is computed per document: :func:`document_attention` is registered with
  transformers' attention interface as ``"rkld_documents"`` and runs the model's own SDPA
  (``is_causal=True``, the memory-efficient kernels: no ``[T, T]`` scores or mask is ever
  built) once per document span, the spans read from where ``position_ids`` restart. This is
  the varlen form of a block-diagonal causal mask; a materialised ``[T, T]`` mask would need
  4 GiB (bool) at 64k tokens and sends SDPA to its quadratic-memory path.

With that implementation transformers builds no attention mask at all, so batches must be
right-padded (padding at the end of a row, as ``rkld.data.collate`` pads): causal attention
then never lets a real token see padding. Padding gets positions of its own (a separate
"document"), so it cannot join the last document either.

Public API:
    DOCUMENT_ATTENTION = "rkld_documents"
    pack_examples(examples, max_tokens) -> list[dict]
        greedy, in order: each packed example holds whole examples, with ``position_ids``
        and ``document_lengths``; an example longer than ``max_tokens`` is an error
    use_document_attention(model)   switch a Hugging Face model to per-document attention
    uses_document_attention(model) -> bool
    document_spans(position_ids_row) -> list[(start, end)]
    document_attention(module, query, key, value, attention_mask, ...)  the attention function
"""
from __future__ import annotations

import torch

from .data import IGNORE_INDEX

DOCUMENT_ATTENTION = "rkld_documents"


def pack_examples(examples: list, max_tokens: int) -> list:
    """Pack examples (``input_ids``, ``attention_mask``, ``labels``) into sequences of at most
    ``max_tokens`` tokens, whole examples only, in their order (greedy: a new pack starts when
    the next example does not fit). Each pack gets ``position_ids`` restarting at every example
    and ``document_lengths``; the first label of every example after a pack's first is -100."""
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 2:
        raise ValueError(f"max_tokens must be an integer >= 2; got {max_tokens!r}")
    packs, current = [], []

    def close():
        if not current:
            return
        pack = {"input_ids": [], "attention_mask": [], "labels": [], "position_ids": [],
                "document_lengths": []}
        for j, example in enumerate(current):
            n = len(example["input_ids"])
            labels = list(example["labels"])
            if j > 0:
                labels[0] = IGNORE_INDEX    # position 0 of a document predicts nothing
            pack["input_ids"] += list(example["input_ids"])
            pack["attention_mask"] += [1] * n
            pack["labels"] += labels
            pack["position_ids"] += list(range(n))
            pack["document_lengths"].append(n)
        packs.append(pack)
        current.clear()

    used = 0
    for i, example in enumerate(examples):
        n = len(example["input_ids"])
        if n > max_tokens:
            raise ValueError(f"example {i} has {n} tokens, more than a pack of max_tokens="
                             f"{max_tokens} holds; cut documents first (encode_text_blocks)")
        if n == 0:
            continue
        if used + n > max_tokens:
            close()
            used = 0
        current.append(example)
        used += n
    close()
    return packs


def document_spans(position_ids: torch.Tensor) -> list:
    """``[(start, end), ...]`` of the documents in one row of ``position_ids``: a document
    starts wherever the position does not continue the previous one (+1)."""
    positions = position_ids.reshape(-1)
    if positions.numel() == 0:
        return []
    starts = torch.nonzero(positions[1:] != positions[:-1] + 1).reshape(-1) + 1
    bounds = [0, *starts.tolist(), positions.numel()]
    return list(zip(bounds[:-1], bounds[1:]))


def document_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                       scaling: float | None = None, position_ids=None, **kwargs):
    """Causal SDPA within each document of each row (``query``/``key``/``value``:
    ``[B, heads, T, D]``); returns ``([B, T, heads, D], None)`` as transformers expects."""
    if attention_mask is not None:
        raise ValueError("document attention builds its own per-document causal attention and "
                         "takes no attention mask; pass right-padded batches with position_ids")
    if kwargs.get("output_attentions"):
        raise ValueError("document attention does not return attention weights")
    groups = getattr(module, "num_key_value_groups", 1)
    options = {"scale": scaling, "dropout_p": dropout, "is_causal": True}
    if groups > 1:
        options["enable_gqa"] = True
    length = query.shape[2]
    rows = []
    for b in range(query.shape[0]):
        spans = [(0, length)] if position_ids is None else document_spans(
            position_ids[b if position_ids.shape[0] > 1 else 0])
        q, k, v = query[b:b + 1], key[b:b + 1], value[b:b + 1]
        parts = [torch.nn.functional.scaled_dot_product_attention(
            q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], **options) for s, e in spans]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    if DOCUMENT_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(DOCUMENT_ATTENTION, document_attention)


def use_document_attention(model) -> None:
    """Switch ``model`` (a Hugging Face model, possibly wrapped) to per-document attention."""
    from .models import unwrap_model
    _register()
    hf_model = unwrap_model(model)
    hf_model.set_attn_implementation(DOCUMENT_ATTENTION)
    if hf_model.config._attn_implementation != DOCUMENT_ATTENTION:
        raise ValueError(f"{type(hf_model).__name__} does not accept a custom attention "
                         f"function; packed documents need one (Llama, Mistral, Qwen do)")


def uses_document_attention(model) -> bool:
    from .models import unwrap_model
    return getattr(unwrap_model(model).config, "_attn_implementation", None) == DOCUMENT_ATTENTION
