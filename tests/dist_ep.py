"""Run under torchrun (gloo, CPU): expert parallelism against the unsharded stock model.

    torchrun --nproc_per_node 2 tests/dist_ep.py qwen3_moe mixtral ...
Exits non-zero on the first mismatch; every check runs on every rank.
"""
import copy
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
# bound before any moe_patch.apply(), as a user's script does: the refusal of torch's own fully_shard on an
# expert-parallel model must not depend on how fully_shard was imported (check_stock_fully_shard_refused)
from torch.distributed.fsdp import fully_shard as torch_fully_shard

sys.path.insert(0, os.path.dirname(__file__))
import moe_patch  # noqa: E402
from moe_patch.ops.experts import GroupedExperts  # noqa: E402
from util import build, rel_err  # noqa: E402


def check(cond, msg):
    if not cond:
        raise AssertionError(f"rank {dist.get_rank()}: {msg}")


def expert_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, GroupedExperts)}


def summed(grad):
    g = grad.clone()
    dist.all_reduce(g)
    return g


def block(t, rank, size):
    n = t.shape[0] // size
    return t[rank * n:(rank + 1) * n]


def compare_grads(stock, patched, rank, size, experts):
    s_params = dict(stock.named_parameters())
    for name, p in patched.named_parameters():
        gs = s_params[name].grad
        gs = torch.zeros_like(s_params[name]) if gs is None else gs
        owner = name.rpartition(".")[0]
        if owner in experts and p.shape != s_params[name].shape:  # sharded: mean over every rank's loss
            gs = block(summed(gs), rank, size) / size
        gp = p.grad if p.grad is not None else torch.zeros_like(p)
        check(rel_err(gp, gs) < GTOL, f"gradient of {name}: rel err {rel_err(gp, gs):.2e}")


DEVICE = torch.device(os.environ.get("EP_TEST_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("EP_TEST_DTYPE", "float32"))
TOL, GTOL = (1e-5, 1e-4) if DTYPE == torch.float32 else (2e-2, 2e-2)


DISPATCHER = os.environ.get("EP_TEST_DISPATCHER", "auto")  # te_ep / deepep on GPU machines that have them


def run_family(model_type, mesh, rank, size):
    stock = build(model_type, dtype=DTYPE).to(DEVICE)
    patched = copy.deepcopy(stock)
    moe_patch.apply(patched, mesh=mesh, dispatcher=DISPATCHER)
    experts = expert_names(patched)
    check(experts, "no experts were patched")
    expected = "all_to_all" if DISPATCHER == "auto" and DEVICE.type == "cpu" else DISPATCHER
    for name in experts:
        m = dict(patched.named_modules())[name]
        check(m.num_experts * size == m.num_global_experts, "not sharded")
        check(expected == "auto" or m.dispatcher.name == expected, f"dispatcher {m.dispatcher.name}")
    check(moe_patch.apply(patched, mesh=mesh, dispatcher=DISPATCHER) is patched, "second apply not idempotent")
    if DISPATCHER != "all_to_all":
        try:
            moe_patch.apply(patched, mesh=mesh, dispatcher="all_to_all")
            check(False, "re-apply with another dispatcher accepted")
        except moe_patch.PatchError:
            pass
    rows = moe_patch.report(patched).where(kind="experts")
    check(all(f"dispatcher {m.dispatcher.name}" in r.reason for r in rows), "dispatcher choice not reported")

    # 1. whole model, uneven batches per rank (rank r: r+1 sequences of 7+2r tokens)
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, 256, (rank + 1, 7 + 2 * rank), generator=g).to(DEVICE)
    with torch.no_grad():
        logits_s, logits_p = stock(input_ids=ids).logits, patched(input_ids=ids).logits
    check(rel_err(logits_p, logits_s) < TOL, f"logits rel err {rel_err(logits_p, logits_s):.2e}")
    out_s = stock(input_ids=ids, labels=ids)
    out_p = patched(input_ids=ids, labels=ids)  # training with labels: the fused-loss path
    check(rel_err(out_p.loss, out_s.loss) < TOL, f"loss rel err {rel_err(out_p.loss, out_s.loss):.2e}")
    out_s.loss.backward()
    out_p.loss.backward()
    pairs = [m._overlap for m in map(dict(patched.named_modules()).get, experts) if m._overlap is not None]
    if model_type in ("deepseek_v3", "glm4_moe", "nemotron_h"):  # blocks that call their experts first
        check(pairs and all(p.handed >= 2 for p in pairs), "shared expert not computed beside the dispatch")
        check(all("beside the dispatch" in r.reason for r in rows), "shared-expert overlap not reported")
    if DTYPE == torch.float32:
        # in bf16 a router near-tie can flip an expert choice between the two models and change the
        # whole-model gradients discretely; the module-level checks below hold the routing fixed
        compare_grads(stock, patched, rank, size, experts)

    # 2. adversarial routings straight into one experts module: everything to rank 0's experts,
    #    rank 1 sending no token at all, and everything to the last expert
    name = sorted(experts)[0]
    s_mod, p_mod = dict(stock.named_modules())[name], dict(patched.named_modules())[name]
    e, k = p_mod.num_global_experts, 2
    hidden = (s_mod.gate_up_proj if p_mod.has_gate else s_mod.up_proj).shape[1 if p_mod.is_transposed else 2]
    for case in ("to_rank0", "rank1_empty", "last_expert", "random"):
        gen = torch.Generator().manual_seed(7 + rank)
        t = 0 if (case == "rank1_empty" and rank == 1) else 5 + rank
        if case == "to_rank0":
            idx = torch.stack([torch.randperm(e // size, generator=gen)[:k] for _ in range(t)])
        elif case == "last_expert":
            idx = torch.tensor([[e - 1, e - 2]] * t, dtype=torch.long)
        else:
            idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]) if t else \
                torch.zeros(0, k, dtype=torch.long)
        idx = idx.to(DEVICE)
        x = torch.randn(t, hidden, generator=gen).to(DEVICE, DTYPE)
        w = torch.rand(t, k, generator=gen).to(DEVICE, DTYPE)
        stock.zero_grad(), patched.zero_grad()
        xs, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        ys, yp = s_mod(xs, idx, w), p_mod(xp, idx, w)
        check(rel_err(yp, ys) < TOL, f"{case}: output rel err {rel_err(yp, ys):.2e}")
        probe = torch.randn(ys.shape, generator=gen).to(DEVICE, DTYPE)
        (ys * probe).sum().backward()
        (yp * probe).sum().backward()
        if t:
            check(rel_err(xp.grad, xs.grad) < GTOL, f"{case}: input gradient")
        for pname, p in p_mod.named_parameters(recurse=False):
            gs = getattr(s_mod, pname).grad
            gs = torch.zeros_like(getattr(s_mod, pname)) if gs is None else gs
            check(rel_err(p.grad, block(summed(gs), rank, size) / size) < GTOL, f"{case}: gradient of {pname}")

    # 3. checkpoint: save_pretrained gathers the experts; stock Transformers loads it; loading back works
    from transformers import AutoModelForCausalLM

    tmp = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(tmp)
    patched.save_pretrained(tmp[0], is_main_process=rank == 0)
    dist.barrier()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp[0], dtype=DTYPE).to(DEVICE)
    check(rel_err(reloaded(ids).logits, stock(ids).logits) < TOL, "checkpoint saved from EP model differs")
    fresh = build(model_type, seed=5, dtype=DTYPE).to(DEVICE)
    moe_patch.apply(fresh, mesh=mesh, dispatcher=DISPATCHER)
    fresh.load_state_dict(reloaded.state_dict())
    check(rel_err(fresh(ids).logits, stock(ids).logits) < TOL, "loading full weights into sharded model")
    dist.barrier()


def main():
    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    if DEVICE.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        globals()["DEVICE"] = torch.device("cuda", torch.cuda.current_device())
    mesh = init_device_mesh(DEVICE.type, (size,), mesh_dim_names=("ep",))
    torch.manual_seed(0)
    targets = dict(fsdp=run_fsdp, fsdp_mp=run_fsdp_mixed_precision, resume=run_resume, ddp=run_ddp,
                   trainer=run_trainer, gc=run_checkpointed, lora=run_lora_experts)
    for model_type in sys.argv[1:]:
        kind, _, family = model_type.rpartition(":")  # "kind:family" targets print their own "ok" line
        if kind == "fsdp2d":  # 4 ranks: experts split over ep=2 and sharded by FSDP2 over dp_shard=2
            mesh2 = init_device_mesh(DEVICE.type, (size // 2, 2), mesh_dim_names=("dp_shard", "ep"))
            run_fsdp(family, mesh2, rank, size)
            continue
        if kind:
            targets[kind](family, mesh, rank, size)
            continue
        run_family(model_type, mesh, rank, size)
        if rank == 0:
            print(f"ok {model_type} ep={size}", flush=True)
    # misuse: a mesh without 'ep', an EP size that does not divide the experts; the model stays untouched
    model = build("qwen3_moe", num_experts=8 if size != 3 else 9)
    before = list(model.modules())
    bad = init_device_mesh(DEVICE.type, (size,), mesh_dim_names=("dp",))
    try:
        moe_patch.apply(model, mesh=bad)
        check(False, "mesh without ep accepted")
    except moe_patch.MeshError as exc:
        check("'ep'" in str(exc), str(exc))
    check(list(model.modules()) == before and not moe_patch.is_patched(model), "model touched")
    bad_options = [(dict(dispatcher="bogus"), moe_patch.PatchError, "bogus"),
                   (dict(max_tokens_per_rank=0), moe_patch.PatchError, "max_tokens_per_rank")]
    if DEVICE.type == "cpu":  # te_ep under gloo: refused with the reason
        bad_options.append((dict(dispatcher="te_ep"), moe_patch.MeshError, "te_ep"))
    for options, error, word in bad_options:
        try:
            moe_patch.apply(model, mesh=mesh, **options)
            check(False, f"{options} accepted")
        except error as exc:
            check(word in str(exc), str(exc))
        check(list(model.modules()) == before and not moe_patch.is_patched(model), "model touched")
    frozen = build("qwen3_moe", dtype=DTYPE).to(DEVICE)  # experts frozen before apply (fine-tuning only the rest): still shards
    for n, p in frozen.named_parameters():
        p.requires_grad_(".experts." not in n)
    moe_patch.apply(frozen, mesh=mesh)
    frozen(input_ids=torch.randint(0, 256, (1, 6)).to(DEVICE), labels=torch.randint(0, 256, (1, 6)).to(DEVICE)).loss.backward()
    # apply() again with another mesh (none) or other expert-parallel options: refused, naming what differs
    for options, words in ((dict(), ("mesh: DeviceMesh", "-> None")), (dict(mesh=mesh, shared_overlap=False),
                                                                        ("shared_overlap: True -> False",))):
        try:
            moe_patch.apply(frozen, **options)
            check(False, f"second apply() with {options} accepted")
        except moe_patch.PatchError as exc:
            check(all(w in str(exc) for w in words) and "revert(model)" not in str(exc), str(exc))
    if DEVICE.type == "cpu":
        check_auto_agreement(mesh["ep"].get_group(), rank)
        check_auto_at_first_forward(mesh, rank)
        check_outside_tree_params_under_fsdp(mesh)
        check_generate_synced(mesh, rank)
        check_ddp_of_wrapper(mesh, rank, size)
        check_composable_replicate(mesh, rank, size)
        if size > 1:
            check_stock_fully_shard_refused(mesh, rank, size)
        if size == 2:
            check_ddp_on_dp_ep_mesh(rank, size)
    if size > 1:
        odd = build("mixtral", num_local_experts=size * 2 + 1)
        try:
            moe_patch.apply(odd, mesh=mesh)
            check(False, "uneven expert split accepted")
        except moe_patch.MeshError as exc:
            check("evenly" in str(exc), str(exc))
    dist.destroy_process_group()



def check_outside_tree_params_under_fsdp(mesh):
    """FSDP2 swaps the Parameter objects (sharded at rest, unsharded per forward): a module computing through
    an outside-tree module (the TE replacements' pattern) must still train its sharded parameters."""
    from torch.distributed.fsdp import fully_shard

    from test_invariants import _OutsideTree

    torch.manual_seed(1)
    ref = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model = copy.deepcopy(ref)
    model[0] = _OutsideTree(model[0])
    for m in (ref, model):
        fully_shard(m[0], mesh=mesh)
        fully_shard(m, mesh=mesh)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(dist.get_rank()))
    ref(x).sum().backward()
    model(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        check(p.grad is not None, f"outside-tree parameter {name} got no gradient under FSDP2")
        check(rel_err(p.grad.full_tensor(), q.grad.full_tensor()) < 1e-5, f"outside-tree gradient of {name}")


def check_stock_fully_shard_refused(mesh, rank, size):
    """torch's own fully_shard on an expert-parallel model took each rank's experts for replicas of one tensor and
    computed with a mix of them (logits 4e-2 to 5e-2 off stock, qwen3_moe, 2 ranks): refused on every rank with a
    one-line MeshError naming fully_shard_moe, before anything changes; the model then still equals stock, and
    fully_shard_moe still shards it. A model FSDP2 manages anyway (the refusal bypassed) is refused at its forward."""
    from torch.distributed.fsdp import FSDPModule

    from moe_patch.parallel.fsdp import fully_shard_moe

    stock = build("qwen3_moe", dtype=DTYPE).to(DEVICE)
    patched = copy.deepcopy(stock)
    moe_patch.apply(patched, mesh=mesh)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(300 + rank)).to(DEVICE)
    with torch.no_grad():
        ref = stock(input_ids=ids).logits
    attempts = [("fully_shard", torch_fully_shard, patched.model.layers[0]),  # a decoder layer (the usual recipe)
                ("fully_shard", torch_fully_shard, patched)]  # the whole model
    try:  # torch's FSDP2-based replicate (its state subclasses FSDPState): refused too, twice, each time in one line
        # (a refusal left replicate's registry entry on the model, and the second call met torch's multi-line
        # "can only be applied to a module once" AssertionError instead)
        from torch.distributed._composable.replicate_with_fsdp import replicate
        attempts += [("replicate", replicate, patched)] * 2
    except ImportError:
        pass
    for api, call, target in attempts:
        try:
            call(target, mesh=mesh)
            check(False, f"torch's {api}({type(target).__name__}) of an expert-parallel model accepted")
        except moe_patch.MeshError as exc:
            msg = str(exc)
            check("fully_shard_moe" in msg and "\n" not in msg and "mlp.experts" in msg and f"torch's {api} " in msg,
                  msg)
        check(not any(isinstance(m, FSDPModule) or getattr(m, "_is_fsdp_managed_module", False)
                      or any(k.startswith("__composable_api_state_key") for k in m.__dict__)
                      for m in patched.modules()), "refused fully_shard left FSDP2 state on the model")
    with torch.no_grad():
        out = patched(input_ids=ids).logits
    check(rel_err(out, ref) < TOL, f"after the refusal: logits rel err {rel_err(out, ref):.2e}")
    fully_shard_moe(patched, mesh)  # what the message says to use: still equal to stock
    loss_s, loss = stock(input_ids=ids, labels=ids).loss, patched(input_ids=ids, labels=ids).loss
    check(rel_err(loss, loss_s) < TOL, f"fully_shard_moe after the refusal: loss rel err {rel_err(loss, loss_s):.2e}")
    # the forward's own check (it holds whatever torch's fully_shard internals become): FSDP2 wrapped around the
    # experts outside fully_shard_moe, as if the refusal at wrap time had been missed
    from moe_patch.parallel import fsdp

    bypassed = copy.deepcopy(stock)
    moe_patch.apply(bypassed, mesh=mesh)
    with fsdp._inside_fully_shard_moe():
        torch_fully_shard(bypassed, mesh=mesh)
    try:
        bypassed(input_ids=ids)
        check(False, "forward of an expert-parallel model under torch's fully_shard accepted")
    except moe_patch.MeshError as exc:
        check("fully_shard_moe" in str(exc) and "\n" not in str(exc), str(exc))
    dist.barrier()
    if rank == 0:
        print(f"ok torch fully_shard refused ep={size}", flush=True)


def check_ddp_of_wrapper(mesh, rank, size):
    """DDP of a module that holds the EP model (a value head beside it, PEFT's PeftModel: what Trainer wraps for
    LoRA under torchrun): the wrap leaves every rank's experts alone (DDP reads its ignore list from the module it
    wraps, by name; it broadcast rank 0's experts over the other ranks' before) and the logits and the experts'
    gradients equal the unsharded model's."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    class WithValueHead(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm, self.value_head = lm, torch.nn.Linear(lm.config.hidden_size, 1)

        def forward(self, **kwargs):
            return self.lm(**kwargs)

    wrappers = [("value head", WithValueHead)]
    try:
        import peft

        wrappers.append(("PEFT LoRA", lambda m: peft.get_peft_model(m, peft.LoraConfig(r=4, target_modules=["q_proj"]))))
    except ImportError:
        pass
    for what, wrap in wrappers:
        stock = build("qwen3_moe", dtype=DTYPE).to(DEVICE)
        patched = moe_patch.apply(copy.deepcopy(stock), mesh=mesh)
        experts = [(n, p, p.detach().clone()) for n, p in patched.named_parameters() if ".experts." in n]
        wrapped = DDP(wrap(patched))
        for n, p, before in experts:
            check(torch.equal(p.detach(), before), f"DDP of {what}: the wrap overwrote this rank's {n}")
        ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(500 + rank)).to(DEVICE)
        with torch.no_grad():
            err = rel_err(wrapped(input_ids=ids).logits, stock(input_ids=ids).logits)
        check(err < TOL, f"DDP of {what}: logits rel err {err:.2e}")
        stock(input_ids=ids, labels=ids).loss.backward()
        wrapped(input_ids=ids, labels=ids).loss.backward()
        s_params = dict(stock.named_parameters())
        for n, p, _ in experts:
            if p.requires_grad:
                gs = block(summed(s_params[n].grad), rank, size) / size
                check(rel_err(p.grad, gs) < GTOL, f"DDP of {what}: gradient of {n}: {rel_err(p.grad, gs):.2e}")
    if len(wrappers) > 1:  # LoRA on the experts' own weights (PEFT target_parameters): per local expert, refused
        lora = peft.get_peft_model(moe_patch.apply(build("qwen3_moe", dtype=DTYPE).to(DEVICE), mesh=mesh),
                                   peft.LoraConfig(r=2, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"]))
        try:
            DDP(lora)
            check(False, "DDP of LoRA on expert-parallel experts accepted (it averaged different experts' adapters)")
        except moe_patch.MeshError as exc:
            check("target_parameters" in str(exc) and "\n" not in str(exc), str(exc))


def check_composable_replicate(mesh, rank, size):
    """torch's composable replicate() (DDP-based: at the first forward it wraps a ParameterList of every parameter in
    DDP): the experts' gradients stay each rank's own (DDP's reducer names the list's own parameters ".name", which the
    ignore list missed: it all-reduced different experts' gradients, 74-83% off on qwen3_moe, 2 ranks), the dense ones
    are averaged; with PEFT LoRA on the experts' own weights it is refused, as DDP is (it averaged their adapters)."""
    try:
        from torch.distributed._composable.replicate import replicate
    except ImportError:
        return
    stock = build("qwen3_moe", dtype=DTYPE).to(DEVICE)
    patched = moe_patch.apply(copy.deepcopy(stock), mesh=mesh)
    experts = [(n, p, p.detach().clone()) for n, p in patched.named_parameters() if ".experts." in n]
    replicate(patched)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(550 + rank)).to(DEVICE)
    stock(input_ids=ids, labels=ids).loss.backward()
    patched(input_ids=ids, labels=ids).loss.backward()  # replicate's DDP is built here
    s_params = dict(stock.named_parameters())
    for n, p in patched.named_parameters():
        gs = summed(s_params[n].grad) / size
        gs = block(gs, rank, size) if p.shape != gs.shape else gs
        check(rel_err(p.grad, gs) < GTOL, f"replicate: gradient of {n}: {rel_err(p.grad, gs):.2e}")
    for n, p, before in experts:
        check(torch.equal(p.detach(), before), f"replicate overwrote this rank's {n}")
    try:
        import peft
    except ImportError:
        return
    lora = peft.get_peft_model(moe_patch.apply(copy.deepcopy(stock), mesh=mesh),
                               peft.LoraConfig(r=2, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"]))
    replicate(lora)
    try:
        lora(input_ids=ids)
        check(False, "replicate() of LoRA on expert-parallel experts accepted (it averaged different experts' adapters)")
    except moe_patch.MeshError as exc:
        check("target_parameters" in str(exc) and "\n" not in str(exc), str(exc))


def check_ddp_on_dp_ep_mesh(rank, size):
    """apply(model, mesh) by hand on a (dp, ep) mesh, then DDP: every expert block has a replica on each dp rank, which
    DDP does not average (the experts are on its ignore list); their gradients are averaged over dp as the launcher's
    are: every gradient is that of the mean of all ranks' losses (it was each rank's own: ~100% off)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    mesh2 = init_device_mesh(DEVICE.type, (size, 1), mesh_dim_names=("dp", "ep"))
    stock = build("qwen3_moe", dtype=DTYPE).to(DEVICE)
    patched = moe_patch.apply(copy.deepcopy(stock), mesh=mesh2)
    wrapped = DDP(patched)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(600 + rank)).to(DEVICE)
    stock(input_ids=ids, labels=ids).loss.backward()
    wrapped(input_ids=ids, labels=ids).loss.backward()
    s_params = dict(stock.named_parameters())
    for n, p in patched.named_parameters():
        gs = summed(s_params[n].grad) / size  # ep = 1: every rank holds every expert
        check(rel_err(p.grad, gs) < GTOL, f"DDP on a (dp, ep) mesh: gradient of {n}: {rel_err(p.grad, gs):.2e}")


def check_generate_synced(mesh, rank):
    """Generation under EP: every forward is a collective, so ranks stopping at different lengths need
    synced_gpus=True (as with FSDP); the tokens equal the unsharded model's."""
    stock = build("qwen3_moe").eval()
    patched = moe_patch.apply(copy.deepcopy(stock), mesh=mesh).eval()
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(rank))
    kw = dict(max_new_tokens=2 + 3 * rank, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = patched.generate(ids, synced_gpus=True, **kw)
    check(torch.equal(out, stock.generate(ids, **kw)), "EP generation differs from the unsharded model")


def check_auto_agreement(group, rank):
    """dispatcher="auto" takes te_ep only when every rank can run it (the availability test is faked)."""
    from moe_patch.parallel import dispatch, te_ep

    real = te_ep.unavailable_reason
    try:
        te_ep.unavailable_reason = lambda g, d: None if rank == 0 else "missing here"
        name, why = dispatch.choose("auto", group, torch.bfloat16)
        expected = "te_ep" if dist.get_world_size(group) == 1 else "all_to_all"
        check(name == expected and (name == "te_ep" or "another rank" in why or "missing" in why), (name, why))
        te_ep.unavailable_reason = lambda g, d: None
        check(dispatch.choose("auto", group, torch.bfloat16)[0] == "te_ep", "auto refused te_ep everywhere")
    finally:
        te_ep.unavailable_reason = real


def check_auto_at_first_forward(mesh, rank):
    """fp32 weights where te_ep would run on bf16 tokens (availability faked): "auto" waits for the first
    forward, decides on the tokens' dtype, the same on every rank, and writes the choice into the report."""
    from moe_patch.parallel import dispatch, te_ep

    real = te_ep.unavailable_reason
    try:
        te_ep.unavailable_reason = lambda g, d: None if d == torch.bfloat16 else "NCCL-EP carries bf16 tokens only"
        stock = build("qwen3_moe")
        patched = moe_patch.apply(copy.deepcopy(stock), mesh=mesh)
        deferred = [m.dispatcher for m in patched.modules() if isinstance(getattr(m, "dispatcher", None),
                                                                            dispatch.DeferredDispatcher)]
        rows = moe_patch.report(patched).where(kind="experts")
        check(deferred and all(d.name == "auto" for d in deferred), "auto not deferred for fp32 weights")
        check(all("first forward" in r.reason for r in rows), "deferred choice not reported")
        ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(rank))
        with torch.no_grad():
            check(rel_err(patched(input_ids=ids).logits, stock(input_ids=ids).logits) < TOL, "deferred auto logits")
        check(all(d.name == "all_to_all" for d in deferred), "fp32 tokens must take all_to_all")
        check(all(r.replacement.endswith("/all_to_all") and "dispatcher all_to_all (float32" in r.reason
                  for r in moe_patch.report(patched).where(kind="experts")), "first-forward choice not reported")
        group = mesh["ep"].get_group()
        mixed = dispatch.FirstForwardChoice(group, []).decide(torch.bfloat16 if rank == 0 else torch.float32)
        check(mixed == ("te_ep" if dist.get_world_size(group) == 1 else "all_to_all"), f"ranks disagree: {mixed}")
        check(dispatch.FirstForwardChoice(group, []).decide(torch.bfloat16) == "te_ep", "bf16 tokens refused")
    finally:
        te_ep.unavailable_reason = real


def run_resume(model_type, mesh, rank, size):
    """Resuming EP training from a DCP checkpoint (moe_patch.parallel.checkpoint), bare and under
    fully_shard_moe: a run stopped after one step and resumed into a freshly built model and optimizer
    continues exactly as the uninterrupted run (every parameter after the next step), and each rank gets its
    own experts' optimizer states back."""
    import torch.distributed.checkpoint as dcp

    from moe_patch.parallel import checkpoint
    from moe_patch.parallel.fsdp import fully_shard_moe

    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(400 + rank)).to(DEVICE)
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    for fsdp in (False, True):
        def make(seed):
            model = moe_patch.apply(build(model_type, seed=seed, dtype=DTYPE).to(DEVICE), mesh=mesh)
            if fsdp:
                fully_shard_moe(model, mesh)
            return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

        def step(model, opt):
            model(input_ids=ids, labels=ids).loss.backward()
            if not fsdp:  # a bare loop averages the dense gradients itself (experts' are averaged by apply)
                for n, p in model.named_parameters():
                    if p.grad is not None and ".experts." not in n:
                        dist.all_reduce(p.grad)
                        p.grad /= size
            opt.step()
            opt.zero_grad()

        a, opt_a = make(0)
        step(a, opt_a)
        path = [tempfile.mkdtemp() if rank == 0 else None]
        dist.broadcast_object_list(path)
        dcp.save(checkpoint.state_dict(a, opt_a), checkpoint_id=path[0])
        saved = {n: {k: full(v).clone() for k, v in opt_a.state[p].items()} for n, p in a.named_parameters()}
        step(a, opt_a)
        b, opt_b = make(1)  # other initial weights: everything must come from the checkpoint
        state = checkpoint.state_dict(b, opt_b)
        dcp.load(state, checkpoint_id=path[0])
        checkpoint.load_state_dict(b, opt_b, state)
        for n, p in b.named_parameters():
            for k, v in opt_b.state[p].items():
                check(rel_err(full(v).float(), saved[n][k].float()) < 1e-6, f"resume: optimizer {k} of {n} (fsdp={fsdp})")
        step(b, opt_b)
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            check(rel_err(full(q), full(p)) < TOL, f"resume: {n} differs from the uninterrupted run (fsdp={fsdp})")
    if rank == 0:
        print(f"ok resume {model_type} ep={size}", flush=True)


def run_fsdp_mixed_precision(model_type, mesh, rank, size):
    """The usual FSDP2 recipe: fp32 master weights, bf16 compute (MixedPrecisionPolicy), against the fp32
    stock model (bf16 tolerance). Where te_ep can run, "auto" decides at the first forward and takes it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from moe_patch.parallel.dispatch import DeferredDispatcher
    from moe_patch.parallel.fsdp import fully_shard_moe

    stock = build(model_type, dtype=torch.float32).to(DEVICE)
    patched = copy.deepcopy(stock)
    moe_patch.apply(patched, mesh=mesh, dispatcher=DISPATCHER)
    deferred = [m.dispatcher for m in patched.modules() if isinstance(getattr(m, "dispatcher", None), DeferredDispatcher)]
    fully_shard_moe(patched, mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(300 + rank)).to(DEVICE)
    loss_s = stock(input_ids=ids, labels=ids).loss
    loss = patched(input_ids=ids, labels=ids).loss
    check(rel_err(loss, loss_s) < 2e-2, f"fsdp_mp loss rel err {rel_err(loss, loss_s):.2e}")
    loss.backward()
    for name, p in patched.named_parameters():
        check(p.grad is not None and p.grad.dtype == torch.float32, f"fsdp_mp: {name} gradient {p.grad}")
    check(all(d.name == "te_ep" for d in deferred), f"deferred auto took {[d.name for d in deferred][:1]}")
    dispatcher = moe_patch.report(patched).where(kind="experts")[0].replacement.rpartition("/")[2]
    if rank == 0:
        print(f"ok fsdp_mp {model_type} ep={size} ({dispatcher})", flush=True)


def run_ddp(model_type, mesh, rank, size):
    """EP model wrapped by DDP (what Trainer does under torchrun): the wrap leaves every rank's experts alone,
    every gradient equals the stock gradient of the mean of the per-rank losses, and clipping by the global
    norm (moe_patch.parallel.clip) equals torch's clipping of the unsharded model."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    stock = build(model_type, dtype=DTYPE).to(DEVICE)
    patched = copy.deepcopy(stock)
    moe_patch.apply(patched, mesh=mesh, dispatcher=DISPATCHER)
    experts = expert_names(patched)
    local = {n: p.detach().clone() for n, p in patched.named_parameters()}
    wrapped = DDP(patched, device_ids=[DEVICE.index] if DEVICE.type == "cuda" else None)
    for n, p in patched.named_parameters():
        check(torch.equal(p.detach(), local[n]), f"ddp wrap changed {n}")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(400 + rank)).to(DEVICE)
    stock(input_ids=ids, labels=ids).loss.backward()
    wrapped(input_ids=ids, labels=ids).loss.backward()
    for p in stock.parameters():  # the reference: gradients of the mean loss, clipped by torch
        p.grad = summed(p.grad if p.grad is not None else torch.zeros_like(p)) / size
    ref_norm = torch.nn.utils.clip_grad_norm_(stock.parameters(), max_norm=0.05)
    from moe_patch.parallel.clip import clip_grad_norm_

    norm = clip_grad_norm_(wrapped, max_norm=0.05)  # counts every rank's experts once
    # (bf16: whole-model gradients are not compared, a router near-tie can flip an expert choice)
    check(DTYPE != torch.float32 or rel_err(norm, ref_norm) < TOL and ref_norm > 0.05, f"grad norm {norm} vs {ref_norm}")
    s_params = dict(stock.named_parameters())
    for name, p in patched.named_parameters():
        gs = s_params[name].grad
        if name.rpartition(".")[0] in experts and p.shape != s_params[name].shape:
            gs = block(gs, rank, size)
        if DTYPE == torch.float32:
            check(rel_err(p.grad, gs) < GTOL, f"ddp gradient of {name}: {rel_err(p.grad, gs):.2e}")
        else:
            check(p.grad is not None, f"ddp: {name} got no gradient")
    if rank == 0:
        print(f"ok ddp {model_type} ep={size}", flush=True)


def run_trainer(model_type, mesh, rank, size):
    """Hugging Face Trainer under torchrun (it wraps the model in DDP) with apply(model, mesh) by hand and
    Trainer's own options: two optimizer steps of the EP model, clipped by max_grad_norm, end with the same weights
    as two steps of the stock model under the same Trainer, and Trainer's own checkpoint loads in stock
    Transformers with those weights (tests/test_launch.py runs the launcher path and resuming)."""
    from transformers import Trainer, TrainingArguments

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    out = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(out)

    def train(model, output_dir):
        args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=2, max_steps=2,
                                 learning_rate=1e-3, max_grad_norm=0.05, save_strategy="steps", save_steps=2, logging_steps=1,
                                 report_to=[], use_cpu=DEVICE.type == "cpu", seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=Data())
        trainer.train()
        return [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]

    stock = build(model_type, dtype=DTYPE).to(DEVICE)
    patched = copy.deepcopy(stock)
    moe_patch.apply(patched, mesh=mesh, dispatcher=DISPATCHER)
    norms_s, norms_p = train(stock, os.path.join(out[0], "stock")), train(patched, os.path.join(out[0], "ep"))
    check(all(abs(a - b) <= 1e-4 * b for a, b in zip(norms_p, norms_s)) and max(norms_s) > 0.05,
          f"trainer: gradient norms {norms_p} vs {norms_s}")
    full = patched.state_dict()  # gathers the experts
    for name, ref in stock.state_dict().items():
        check(rel_err(full[name], ref) < TOL, f"trainer: {name} differs after training: {rel_err(full[name], ref):.2e}")
    dist.barrier()
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(os.path.join(out[0], "ep", "checkpoint-2"), dtype=DTYPE).to(DEVICE)
    loaded = saved.state_dict()
    for name, ref in stock.state_dict().items():  # a stock model loads Trainer's checkpoint
        check(rel_err(loaded[name], ref) < TOL, f"trainer checkpoint: {name}")
    if rank == 0:
        print(f"ok trainer {model_type} ep={size}", flush=True)


def run_lora_experts(model_type, mesh, rank, size):
    """PEFT LoRA on the experts' own weights (target_parameters) of an EP model, a bare loop without DDP: one step
    clipped by torch's clip_grad_norm_, then PeftModel.save_pretrained from every rank (rank 0 writes). The adapter
    holds every expert's LoRA pair in the unsharded layout (it held rank 0's local experts only, at local shapes that
    a stock model refused to load): a stock model + PeftModel.from_pretrained gives the EP model's logits, and an EP
    model loads it back. The step equals the same step of the unsharded model (the clipping norm counts every rank's
    expert adapters: it was this rank's own)."""
    import peft
    from safetensors.torch import load_file

    def config():
        return peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False,
                               target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])

    stock = build(model_type, dtype=DTYPE).to(DEVICE)
    torch.manual_seed(0)  # the dense adapters (q_proj) are replicas: the same init on every rank
    lora = peft.get_peft_model(moe_patch.apply(copy.deepcopy(stock), mesh=mesh, dispatcher=DISPATCHER), config())
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(700 + rank)).to(DEVICE)
    paths = [[tempfile.mkdtemp() for _ in range(2)] if rank == 0 else None]
    dist.broadcast_object_list(paths)

    def save(path):
        lora.save_pretrained(path, is_main_process=rank == 0)  # every rank: the adapters are gathered
        dist.barrier()
        return peft.PeftModel.from_pretrained(copy.deepcopy(stock), path, is_trainable=True)

    def same_logits(ref, what):
        with torch.no_grad():
            err = rel_err(lora(input_ids=ids).logits, ref(input_ids=ids).logits)
        check(err < TOL, f"lora: {what}: logits rel err {err:.2e}")

    ref = save(paths[0][0])  # the unsharded model with the same adapters
    same_logits(ref, "stock model + the adapter saved before training")
    wrappers = [m for m in lora.modules() if isinstance(m, peft.tuners.lora.layer.ParamWrapper)]
    n_experts = len(expert_names(lora))
    check(n_experts and len(wrappers) == 2 * n_experts, f"lora: {len(wrappers)} ParamWrappers, {n_experts} experts")
    saved = load_file(os.path.join(paths[0][0], "adapter_model.safetensors"))
    for w in wrappers:  # whole: [r * E, in] and [out, r * E]
        name = next(n for n, m in lora.named_modules() if m is w).replace(".default", "")
        a, b = saved[f"{name}.lora_A.weight"], saved[f"{name}.lora_B.weight"]
        e = w.get_base_layer().num_global_experts
        check(a.shape[0] == 2 * e and b.shape[1] == 2 * e and w.num_experts * size == e, f"lora: saved {name} {a.shape}")
    # one step of each, clipped (max_norm under the norm: clipping acts), SGD
    lora(input_ids=ids, labels=ids).loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    experts = {id(p) for w in wrappers for p in (w.lora_A["default"].weight, w.lora_B["default"].weight)}
    for p in ref.parameters():  # the unsharded reference: gradients of the mean of the per-rank losses
        if p.grad is not None:
            p.grad = summed(p.grad) / size
    for p in lora.parameters():  # a bare loop averages the dense gradients itself
        if p.grad is not None and id(p) not in experts:
            p.grad = summed(p.grad) / size
    trained = [p for p in lora.parameters() if p.requires_grad]
    check(any(id(p) in experts for p in trained), "lora: the experts' adapters are not trained")
    ref_norm = torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.requires_grad], max_norm=0.05)
    norm = torch.nn.utils.clip_grad_norm_(trained, max_norm=0.05)
    check(rel_err(norm, ref_norm) < TOL and ref_norm > 0.05, f"lora: grad norm {norm} vs {ref_norm}")
    optimizers = [torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0) for model in (lora, ref)]
    for opt in optimizers:
        opt.step()
    from moe_patch.parallel import checkpoint

    try:  # DCP of their optimizer states (per local expert under one name) would keep one rank's: refused
        checkpoint.state_dict(lora.base_model.model, optimizers[0])
        check(False, "lora: checkpoint.state_dict with the experts' adapters in the optimizer accepted")
    except moe_patch.MeshError as exc:
        check("target_parameters" in str(exc) and "\n" not in str(exc), str(exc))
    same_logits(ref, "after one step, against the unsharded model's step")
    loaded = save(paths[0][1])
    same_logits(loaded, "stock model + the adapter saved after the step")
    whole = lora.state_dict()  # gathers the experts and their adapters
    for name, value in ref.state_dict().items():
        check(rel_err(whole[name], value) < TOL, f"lora: {name} after the step: {rel_err(whole[name], value):.2e}")
    back = peft.PeftModel.from_pretrained(moe_patch.apply(copy.deepcopy(stock), mesh=mesh, dispatcher=DISPATCHER),
                                          paths[0][1])  # an EP model loads its own saved adapter: its block of it
    with torch.no_grad():
        err = rel_err(back(input_ids=ids).logits, loaded(input_ids=ids).logits)
    check(err < TOL, f"lora: EP model + the saved adapter: logits rel err {err:.2e}")
    # under fully_shard_moe (plain per-expert adapters beside DTensor experts): refused, in either order
    from moe_patch.parallel.fsdp import fully_shard_moe

    sharded = moe_patch.apply(copy.deepcopy(stock), mesh=mesh, dispatcher=DISPATCHER)
    fully_shard_moe(sharded, mesh)
    for what, call in (("fully_shard_moe with the adapters", lambda: fully_shard_moe(back.base_model.model, mesh)),
                       ("get_peft_model after fully_shard_moe", lambda: peft.get_peft_model(sharded, config()))):
        try:
            call()
            check(False, f"lora: {what} accepted")
        except moe_patch.MeshError as exc:
            check("fully_shard_moe" in str(exc) and "\n" not in str(exc), f"{what}: {exc}")
    if rank == 0:
        print(f"ok lora {model_type} ep={size}", flush=True)


def run_checkpointed(model_type, mesh, rank, size):
    """EP under Transformers' gradient checkpointing (the dispatch runs again in the recomputation) with the
    router's load-balancing loss in the training loss (output_router_logits): same loss and gradients."""
    stock = build(model_type, dtype=DTYPE, output_router_logits=True).to(DEVICE)
    patched = copy.deepcopy(stock)
    moe_patch.apply(patched, mesh=mesh, dispatcher=DISPATCHER)
    patched.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patched.train(), stock.train()
    g = torch.Generator().manual_seed(300 + rank)
    ids = torch.randint(0, 256, (2, 11), generator=g).to(DEVICE)
    out_s, out_p = stock(input_ids=ids, labels=ids), patched(input_ids=ids, labels=ids)
    if getattr(out_s, "aux_loss", None) is not None:  # DeepSeek-V3 style routers have no auxiliary loss
        check(rel_err(out_p.aux_loss, out_s.aux_loss) < TOL, "aux loss differs")
    elif model_type in ("qwen3_moe", "mixtral"):
        check(False, f"{model_type}: no aux loss with output_router_logits")
    check(rel_err(out_p.loss, out_s.loss) < TOL, f"loss rel err {rel_err(out_p.loss, out_s.loss):.2e}")
    out_s.loss.backward()
    out_p.loss.backward()
    modules = dict(patched.named_modules())
    pairs = [modules[n]._overlap for n in expert_names(patched) if modules[n]._overlap is not None]
    if model_type in ("deepseek_v3", "glm4_moe", "nemotron_h"):
        # the forward hands over; the recomputation runs the shared expert inside the experts again and stops
        # there (torch's checkpoint stops once every saved tensor is back), so the block's call never comes
        check(pairs and all(p.handed == 1 and p.kept is None for p in pairs), "shared expert not handed over")
    if DTYPE == torch.float32:
        compare_grads(stock, patched, rank, size, expert_names(patched))
    if rank == 0:
        print(f"ok gc {model_type} ep={size}", flush=True)


def run_fsdp(model_type, mesh, rank, size):
    """EP + FSDP2: every gradient equals the stock gradient of the mean of the per-rank losses. On a 1-D
    ("ep",) mesh, or (fsdp2d, 4 ranks) on a ("dp_shard", "ep") mesh where FSDP2 shards the experts too."""
    from moe_patch.parallel.fsdp import fully_shard_moe

    ep_rank, ep_size, two_d = mesh["ep"].get_local_rank(), mesh["ep"].size(), mesh.ndim == 2

    stock = build(model_type, dtype=DTYPE).to(DEVICE)
    patched = copy.deepcopy(stock)
    moe_patch.apply(patched, mesh=mesh, dispatcher=DISPATCHER)
    fully_shard_moe(patched, mesh)
    # 1-D mesh: the experts are DTensors sharded over the ep ranks that FSDP2 does not manage (no copies per step);
    # with a dp_shard dimension FSDP2 shards them over it
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for m in patched._moe_patch.sharded:
        stacked = [p for p in m.parameters(recurse=False) if p.dim() >= 2]
        check(isinstance(m, FSDPModule) == two_d and all(isinstance(p, DTensor) for p in stacked)
              and all(p.device_mesh.size() == (mesh["dp_shard"].size() if two_d else size) for p in stacked),
              f"fsdp: experts not laid out as expected (2-D mesh: {two_d})")
    g = torch.Generator().manual_seed(200 + rank)
    ids = torch.randint(0, 256, (2, 9), generator=g).to(DEVICE)
    loss_s = stock(input_ids=ids, labels=ids).loss
    loss = patched(input_ids=ids, labels=ids).loss
    check(rel_err(loss, loss_s) < TOL, f"fsdp loss rel err {rel_err(loss, loss_s):.2e}")
    loss_s.backward()
    loss.backward()
    for name, p in patched.named_parameters():  # every sharded parameter trains (TE modules included)
        check(p.grad is not None, f"fsdp: {name} got no gradient")
    # checkpoint with torch's FSDP2 recipe: a full state dict (the experts gathered too), written by rank 0
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    full = get_model_state_dict(patched, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(out)
    if rank == 0:
        patched.save_pretrained(out[0], state_dict=full)
    dist.barrier()
    reloaded = AutoModelForCausalLM.from_pretrained(out[0], dtype=DTYPE).to(DEVICE)
    with torch.no_grad():
        check(rel_err(reloaded(input_ids=ids).logits, stock(input_ids=ids).logits) < TOL, "fsdp checkpoint")
    if DTYPE != torch.float32:  # gradient values: fp32 only (a bf16 router near-tie flips experts)
        if rank == 0:
            print(f"ok fsdp {model_type} ep={size}", flush=True)
        return
    s_params = dict(stock.named_parameters())
    experts = expert_names(patched)
    for name, p in patched.named_parameters():
        full = p.grad.full_tensor()
        gs = summed(s_params[name].grad if s_params[name].grad is not None else torch.zeros_like(s_params[name]))
        gs = gs / size
        if name.rpartition(".")[0] in experts and two_d:  # 1-D: the experts' DTensor is whole (sharded over ep)
            gs = block(gs, ep_rank, ep_size)
        check(rel_err(full, gs) < GTOL, f"fsdp gradient of {name}: {rel_err(full, gs):.2e}")
    # clipping by the global norm equals torch's on the unsharded model
    from moe_patch.parallel.clip import clip_grad_norm_

    for p in stock.parameters():
        p.grad = summed(p.grad if p.grad is not None else torch.zeros_like(p)) / size
    ref_norm = torch.nn.utils.clip_grad_norm_(stock.parameters(), max_norm=0.05)
    if not two_d:  # torch's own clipping (Trainer's and accelerate's): every parameter a DTensor on one mesh
        torch_norm = torch.nn.utils.clip_grad_norm_(patched.parameters(), max_norm=float("inf"))
        torch_norm = torch_norm.full_tensor() if hasattr(torch_norm, "full_tensor") else torch_norm
        check(rel_err(torch_norm, ref_norm) < TOL, f"fsdp: torch's grad norm {torch_norm} vs {ref_norm}")
    norm = clip_grad_norm_(patched, max_norm=0.05)
    check(rel_err(norm, ref_norm) < TOL and ref_norm > 0.05, f"fsdp grad norm {norm} vs {ref_norm}")
    s_params = dict(stock.named_parameters())
    for name, p in patched.named_parameters():
        gs = s_params[name].grad
        gs = block(gs, ep_rank, ep_size) if name.rpartition(".")[0] in expert_names(patched) and two_d else gs
        check(rel_err(p.grad.full_tensor(), gs) < GTOL, f"fsdp clipped gradient of {name}")
    if rank == 0:
        print(f"ok fsdp2d {model_type} ep={ep_size} dp_shard={size // ep_size}" if two_d
              else f"ok fsdp {model_type} ep={size}", flush=True)


if __name__ == "__main__":
    main()
    # every check passed: skip the interpreter teardown, which on CPU (gloo + FSDP2) now and then aborts in a
    # C++ thread destructor after the work is done (seen with benchmarks/ep_train.py)
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
