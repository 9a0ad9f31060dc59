"""Hugging Face Trainer checkpoints for an expert-parallel model.

Trainer saves from rank 0 only, but the state_dict() of an expert-parallel model is a collective (it gathers
the experts from every rank), so Trainer's own saving would leave rank 0 waiting. Turn it off and let this
callback save a standard checkpoint (model weights, config) from every rank at the same steps:

    args = TrainingArguments(..., save_strategy="no", max_grad_norm=0)
    Trainer(model, args, ..., callbacks=[ExpertParallelCheckpoint(every=500)])

Optimizer and scheduler states are not saved (each rank's expert states differ; see README).
"""
from __future__ import annotations

import os

from transformers import TrainerCallback


class ExpertParallelCheckpoint(TrainerCallback):
    def __init__(self, every: int, output_dir: str | None = None):
        if every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        self.every, self.output_dir = every, output_dir

    def _save(self, args, state, model):
        path = os.path.join(self.output_dir or args.output_dir, f"checkpoint-{state.global_step}")
        model.save_pretrained(path, is_main_process=state.is_world_process_zero)  # collective: every rank

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._save(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every:  # the last step, unless just saved
            self._save(args, state, model)
