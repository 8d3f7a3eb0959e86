"""RKLD unlearning with a Hugging Face ``Trainer``: override ``compute_loss``.

The Trainer optimises the student as usual; the two frozen teachers (original and
strengthened) are held by the subclass and only run forward, under ``torch.no_grad()``.
``fused_linear_rkl_loss`` takes the final hidden states and lm_head weights, so no
[tokens, vocabulary] logits tensor is ever materialised.

Runs on a CPU in a few seconds with a randomly initialised tiny Llama:
``python examples/hf_trainer.py``.
"""
import copy
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from rkld_kernels import fused_linear_rkl_loss


class RKLDTrainer(Trainer):
    def __init__(self, *args, original, strengthened, alpha: float = 8.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.teachers = [t.eval().requires_grad_(False) for t in (original, strengthened)]
        self.alpha = alpha

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"][:, 1:]        # position t predicts token t+1; -100 = masked
        kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        with torch.no_grad():
            original_hidden, strengthened_hidden = (
                t.base_model(**kwargs).last_hidden_state[:, :-1] for t in self.teachers)
        student_hidden = model.base_model(**kwargs).last_hidden_state[:, :-1]
        loss = fused_linear_rkl_loss(
            student_hidden, model.get_output_embeddings().weight,
            original_hidden, self.teachers[0].get_output_embeddings().weight,
            strengthened_hidden, self.teachers[1].get_output_embeddings().weight,
            alpha=self.alpha, labels=labels)
        return (loss, None) if return_outputs else loss


def tiny_forget_set(vocab_size: int, n: int = 8, length: int = 24, question: int = 6) -> list:
    rows = []
    for _ in range(n):
        ids = torch.randint(0, vocab_size, (length,))
        labels = ids.clone()
        labels[:question] = -100
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return rows


def main(steps: int = 8, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64)
    original = LlamaForCausalLM(config)
    forget = tiny_forget_set(config.vocab_size)
    # Stand-in for `rkld strengthen`: perturb a copy so that the teacher differs from the original.
    strengthened = copy.deepcopy(original)
    with torch.no_grad():
        strengthened.lm_head.weight.add_(0.05 * torch.randn_like(strengthened.lm_head.weight))
    student = copy.deepcopy(original)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=4,
                                 learning_rate=3e-3, weight_decay=0.01, logging_steps=1,
                                 save_strategy="no", report_to=[], use_cpu=True,
                                 disable_tqdm=True, seed=seed)
        trainer = RKLDTrainer(model=student, args=args, train_dataset=forget,
                              original=original, strengthened=strengthened, alpha=8.0)
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"RKLD loss over {len(losses)} Trainer steps: {losses[0]:.4f} -> {losses[-1]:.4f}")
    return {"losses": losses}


if __name__ == "__main__":
    main()
