"""An ordinary Hugging Face Trainer script, with nothing of moe_patch in it: the tests run it as stock
(`python`), patched (`MOE_PATCH=1 python`) and expert-parallel (`MOE_PATCH=1 MOE_PATCH_EP=2 torchrun ...`).

    python tests/trainer_script.py OUT --batch 4 --steps 4 [--save-steps 2] [--resume CKPT] [--distributed-config EP]

Writes OUT/history.json (rank 0: Trainer's log history) and OUT/final (trainer.save_model()).
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from util import build  # noqa: E402  (a tiny random Qwen3-MoE through AutoModelForCausalLM.from_config)


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--model", default="qwen3_moe")
    parser.add_argument("--cuda", action="store_true", help="train on the GPU (the default is use_cpu=True)")
    parser.add_argument("--distributed-config", type=int, default=0, metavar="EP",
                        help="load the model with from_pretrained(distributed_config=DistributedConfig(ep_size=EP, "
                             "fsdp_size=WORLD_SIZE)) (Trainer then saves the model only)")
    args = parser.parse_args()

    from transformers import Trainer, TrainingArguments

    model = build(args.model)
    if args.distributed_config:
        from transformers import AutoModelForCausalLM
        from transformers.distributed import DistributedConfig

        initial = os.path.join(args.out, f"initial-{os.environ['RANK']}")  # the same weights on every rank
        model.save_pretrained(initial)
        model = AutoModelForCausalLM.from_pretrained(initial, distributed_config=DistributedConfig(
            ep_size=args.distributed_config, fsdp_size=int(os.environ["WORLD_SIZE"])))
    training = TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=1e-2,
        lr_scheduler_type="linear", max_grad_norm=0.5, logging_steps=1, report_to=[], use_cpu=not args.cuda, seed=0,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        dataloader_num_workers=0, disable_tqdm=True, save_only_model=bool(args.distributed_config))
    trainer = Trainer(model=model, args=training, train_dataset=Data())
    trainer.train(resume_from_checkpoint=args.resume)
    trainer.save_model(os.path.join(args.out, "final"))
    if trainer.is_world_process_zero():
        experts = model.model.layers[0].mlp.experts  # what the test checks: how many experts this rank holds
        with open(os.path.join(args.out, "history.json"), "w") as f:
            local = experts.gate_up_proj
            local = local.to_local() if hasattr(local, "to_local") else local  # DTensor experts (FSDP2 models)
            json.dump({"log": trainer.state.log_history, "local_experts": local.shape[0]}, f)
    # every rank waits until rank 0 has written its history: a rank that aborts at interpreter exit (see
    # test_launch.TEARDOWN_ABORT) then cannot get rank 0 killed before the work is on disk
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
