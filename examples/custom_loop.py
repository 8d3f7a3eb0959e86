"""RKLD unlearning in your own training loop with ``fused_linear_rkl_loss``.

The three models share one architecture and tokenizer:
  original      the model that knows the forget set (frozen teacher)
  strengthened  the original fine-tuned further on the forget set (frozen teacher)
  student       initialised from the original; trained to forget

The loss takes final hidden states (the input of lm_head) and the lm_head weights, so the
[tokens, vocabulary] logits exist only one chunk at a time. Labels are aligned with the hidden
states' positions: position t predicts token t+1, and -100 masks the question and padding.

Runs on a CPU in a few seconds with a randomly initialised tiny Llama:
``python examples/custom_loop.py``.
"""
import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rkld_kernels import fused_linear_rkl_loss


def final_hidden(model, input_ids, attention_mask):
    """Hidden states entering lm_head (after the final norm), without computing any logits."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def forget_set_nll(model, input_ids, attention_mask, labels):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.item()


def main(steps: int = 20, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64)
    original = LlamaForCausalLM(config).eval()

    # A forget batch: 4 sequences whose first 6 tokens are the "question" (not supervised).
    input_ids = torch.randint(0, config.vocab_size, (4, 24))
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, :6] = -100

    # Strengthen: a few NLL steps on the forget set (in practice: `rkld strengthen`).
    strengthened = copy.deepcopy(original).train()
    opt = torch.optim.AdamW(strengthened.parameters(), lr=3e-3)
    for _ in range(10):
        loss = strengthened(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    strengthened.eval().requires_grad_(False)
    original.requires_grad_(False)

    student = copy.deepcopy(original).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=0.01)
    shifted_labels = labels[:, 1:]              # position t predicts token t+1
    nll_before = forget_set_nll(student, input_ids, attention_mask, labels)
    losses = []
    for _ in range(steps):
        with torch.no_grad():                   # teachers never get gradients
            original_hidden = final_hidden(original, input_ids, attention_mask)[:, :-1]
            strengthened_hidden = final_hidden(strengthened, input_ids, attention_mask)[:, :-1]
        student_hidden = final_hidden(student, input_ids, attention_mask)[:, :-1]
        loss = fused_linear_rkl_loss(
            student_hidden, student.get_output_embeddings().weight,
            original_hidden, original.get_output_embeddings().weight,
            strengthened_hidden, strengthened.get_output_embeddings().weight,
            alpha=8.0, labels=shifted_labels, direction="reverse")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    nll_after = forget_set_nll(student, input_ids, attention_mask, labels)
    print(f"RKLD loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
          f"forget-set NLL {nll_before:.3f} -> {nll_after:.3f}")
    return {"losses": losses, "nll_before": nll_before, "nll_after": nll_after}


if __name__ == "__main__":
    main()
