"""An ordinary TRL SFTTrainer script, with nothing of moe_patch in it: the tests run it as stock (`python`) and
expert-parallel (`MOE_PATCH=1 MOE_PATCH_EP=2 torchrun ...`).

    python tests/sft_script.py OUT --batch 4 --steps 4 [--save-steps 2] [--resume CKPT] [--aux-coef 0]

Pre-tokenized data (random ids, one length: no padding) and a word-level tokenizer built here (no download).
Writes OUT/history.json (rank 0: the trainer's log history) and OUT/final (trainer.save_model()).
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from util import build  # noqa: E402  (a tiny random Qwen3-MoE through AutoModelForCausalLM.from_config)


def tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(256)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   pad_token="t0", eos_token="t1", unk_token="t0")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--aux-coef", type=float, default=None,
                        help="router_aux_loss_coef (SFTTrainer adds the router's load-balancing loss, computed over "
                             "each rank's own batch: 0 makes one process and several compute the same loss)")
    args = parser.parse_args()

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    ids = [torch.randint(2, 256, (12,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(64)]
    model = build("qwen3_moe", **({} if args.aux_coef is None else {"router_aux_loss_coef": args.aux_coef}))
    config = SFTConfig(
        output_dir=args.out, per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=1e-2,
        lr_scheduler_type="linear", max_grad_norm=0.5, logging_steps=1, report_to=[], use_cpu=True, seed=0,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        dataloader_num_workers=0, disable_tqdm=True, max_length=None, bf16=False)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"input_ids": ids}),
                         processing_class=tokenizer())
    trainer.train(resume_from_checkpoint=args.resume)
    trainer.save_model(os.path.join(args.out, "final"))
    if trainer.is_world_process_zero():
        experts = model.model.layers[0].mlp.experts
        with open(os.path.join(args.out, "history.json"), "w") as f:
            json.dump({"log": trainer.state.log_history, "local_experts": experts.gate_up_proj.shape[0]}, f)
    # every rank waits until rank 0 has written its history: a rank that aborts at interpreter exit (see
    # test_launch.TEARDOWN_ABORT) then cannot get rank 0 killed before the work is on disk
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
