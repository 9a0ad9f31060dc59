"""Run under torchrun (gloo, CPU): from_pretrained(..., distributed_config=DistributedConfig(ep_size=EP,
fsdp_size=WORLD)) with moe_patch, against the stock single-process model on the concatenated batch.

    torchrun --nproc_per_node 2 tests/dist_config.py OUT apply 2     # moe_patch.apply(model) after loading
    MOE_PATCH=1 torchrun --nproc_per_node 2 tests/dist_config.py OUT auto 2   # no moe_patch call in the script
    torchrun --nproc_per_node 4 tests/dist_config.py OUT apply 2     # 2-D: 2 copies of each expert block

Checks on every rank: moe_patch's expert parallelism took the model (Transformers' FSDP2 and EP gone, moe_patch's
experts sharded over EP with FSDP2 over the rest), logits / loss / every gradient equal to stock's, save_pretrained
writes the checkpoint it loaded, a bad MOE_PATCH_EP is one line and changes nothing. Rank 0 writes OUT/ok.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from util import build, rel_err  # noqa: E402
from moe_patch.ops.experts import GroupedExperts  # noqa: E402

TOL, GTOL = 1e-5, 1e-4


def check(cond, msg):
    if not cond:
        raise AssertionError(f"rank {dist.get_rank()}: {msg}")


def whole(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main():
    out, mode, ep = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ckpt = os.path.join(out, "checkpoint")
    import moe_patch
    from moe_patch import auto
    from moe_patch.parallel.launch import check as launch_check
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    if rank == 0:
        with auto.suspended():
            build("qwen3_moe").save_pretrained(ckpt)
    dist.barrier()
    with auto.suspended():  # the reference: stock, one process, whole batch
        stock = AutoModelForCausalLM.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(
        ckpt, distributed_config=DistributedConfig(ep_size=ep, fsdp_size=world))
    if mode == "apply":
        check(not moe_patch.is_patched(model) and type(model).__name__.startswith("FSDP"), "not Transformers' FSDP2")
        os.environ["MOE_PATCH_EP"] = str(ep + 1)  # the launcher's setting disagrees with the config: one line
        for call in (lambda: moe_patch.apply(model), lambda: launch_check(model)):
            try:
                call()
                check(False, "a MOE_PATCH_EP other than ep_size was accepted")
            except moe_patch.MeshError as exc:
                check("\n" not in str(exc) and f"MOE_PATCH_EP={ep + 1}" in str(exc), f"error: {exc}")
        del os.environ["MOE_PATCH_EP"]
        check(not moe_patch.is_patched(model) and type(model).__name__.startswith("FSDP"), "changed by a bad size")
        try:  # fails after Transformers' distribution was undone: it is put back (the rest below runs on that)
            moe_patch.apply(model, dispatcher="no_such_dispatcher")
            check(False, "a bad dispatcher was accepted")
        except moe_patch.PatchError as exc:
            check("no_such_dispatcher" in str(exc), f"error: {exc}")
        experts = model.model.layers[0].mlp.experts
        check(not moe_patch.is_patched(model) and type(model).__name__.startswith("FSDP")
              and "forward" in experts.__dict__ and experts.num_experts == 8 // ep, "Transformers' EP not put back")
        check(moe_patch.apply(model) is model, "apply() did not return the model")
    check(moe_patch.is_patched(model), "moe_patch did not take the model")
    check(moe_patch.apply(model) is model, "second apply() not a no-op")
    rows = moe_patch.report(model).where(kind="experts")
    check(rows and all(f"ep{ep}/all_to_all" in r.replacement and "DistributedConfig" in r.reason for r in rows),
          f"experts rows: {[(r.replacement, r.reason) for r in rows]}")
    experts = model.model.layers[0].mlp.experts
    check(isinstance(experts, GroupedExperts) and experts.num_global_experts == 8
          and experts.num_experts == 8 // ep, f"experts not moe_patch's, or not sharded: {type(experts).__mro__[:3]}")
    check(type(model).__name__.startswith("FSDP") and "forward" not in experts.__dict__, "FSDP2 / EP layout")

    ids = torch.randint(0, 256, (2 * world, 12), generator=torch.Generator().manual_seed(1))
    local = ids[2 * rank:2 * rank + 2]
    with torch.no_grad():
        logits, ref_logits = model(input_ids=local).logits, stock(input_ids=ids).logits[2 * rank:2 * rank + 2]
    check(rel_err(logits, ref_logits) < TOL, f"logits rel err {rel_err(logits, ref_logits):.2e}")
    loss = model(input_ids=local, labels=local).loss
    loss.backward()
    ref = stock(input_ids=ids, labels=ids).loss
    ref.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    mean /= world
    check(rel_err(mean, ref.detach()) < TOL, f"loss {mean.item()} vs stock {ref.item()}")
    ref_grads = dict(stock.named_parameters())
    ep_rank = rank % ep  # ("dp_shard", "ep") mesh, row-major
    n = 0
    for name, p in model.named_parameters():
        got, want = whole(p.grad), ref_grads[name].grad
        if got.shape != want.shape:  # an expert block of a 2-D mesh (FSDP2 over dp_shard of this ep rank's block)
            k = got.shape[0]
            want = want[ep_rank * k:(ep_rank + 1) * k]
        check(rel_err(got, want) < GTOL, f"gradient of {name}: rel err {rel_err(got, want):.2e}")
        n += 1
    check(n == len(ref_grads), f"{n} gradients compared of {len(ref_grads)}")

    model.save_pretrained(os.path.join(out, "saved"))  # every rank (a collective); rank 0 writes
    dist.barrier()
    if rank == 0:
        from safetensors.torch import load_file

        saved, original = (load_file(os.path.join(out, d, "model.safetensors")) for d in ("saved", "checkpoint"))
        check(saved.keys() == original.keys(), f"keys differ: {sorted(saved.keys() ^ original.keys())[:4]}")
        for key in original:
            check(torch.equal(saved[key], original[key]), f"saved {key} differs")
        open(os.path.join(out, "ok"), "w").write("ok")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
