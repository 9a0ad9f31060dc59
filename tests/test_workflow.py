"""The Hugging Face workflow on a patched model, and misuse that must fail clearly and change nothing."""
import copy
import warnings

import pytest
import torch

import moe_patch
from util import build, inputs, rel_err


def test_trainer_loss_matches_stock_step_for_step(tmp_path):
    from datasets_free import tiny_dataset
    from transformers import Trainer, TrainingArguments

    losses = {}
    for name in ("stock", "patched"):
        model = build("qwen3_moe")
        if name == "patched":
            moe_patch.apply(model)
        args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=2,
                                 learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
                                 use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset())
        trainer.train()
        losses[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses["stock"]) == 4
    for a, b in zip(losses["stock"], losses["patched"]):
        assert abs(a - b) <= 1e-4 * abs(a)


def test_gradient_checkpointing():
    stock = build("mixtral")
    patched = copy.deepcopy(stock)
    moe_patch.apply(patched)
    for m in (stock, patched):
        m.gradient_checkpointing_enable()
        m.train()
    ids = inputs()
    ls, lp = stock(input_ids=ids, labels=ids).loss, patched(input_ids=ids, labels=ids).loss
    ls.backward(), lp.backward()
    assert rel_err(lp.detach(), ls.detach()) < 1e-5
    g = dict(stock.named_parameters())
    for n, p in patched.named_parameters():
        if p.grad is not None:
            assert rel_err(p.grad, g[n].grad) < 1e-4, n


def test_generate_with_kv_cache():
    stock = build("qwen2_moe").eval()
    patched = moe_patch.apply(copy.deepcopy(stock))
    ids = inputs(batch=1, seq=5)
    kw = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(stock.generate(ids, **kw), patched.generate(ids, **kw))


def test_peft_lora_on_attention_projections():
    peft = pytest.importorskip("peft")
    model = moe_patch.apply(build("qwen3_moe"))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = inputs()
    lora(input_ids=ids, labels=ids).loss.backward()
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    assert all(p.grad is not None for n, p in lora.named_parameters() if p.requires_grad)


def test_torch_compile_of_patched_model():
    stock = build("qwen3_moe")
    patched = moe_patch.apply(copy.deepcopy(stock))
    compiled = torch.compile(patched, backend="eager")  # graph capture without a C++ toolchain
    ids = inputs()
    assert rel_err(compiled(ids).logits, stock(ids).logits) < 1e-5


def test_gpu_compiled_path_traces_under_torch_compile(monkeypatch):
    """The GPU path of moe_patch's compiled helpers (RMSNorm's autograd.Function around compiled formulas),
    forced on here with the aot_eager backend (no C++ toolchain): training loss and norm-weight gradients equal
    stock, eagerly and inside a user's torch.compile of the whole model."""
    from moe_patch.ops import compiled

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kw: compile_(fn, **{**kw, "backend": "aot_eager"}))
    monkeypatch.setattr(compiled, "_CACHE", {})
    monkeypatch.setattr(compiled, "active", lambda t: True)
    stock = build("qwen3_moe")
    ids = inputs()
    ref = stock(input_ids=ids, labels=ids).loss
    ref.backward()
    for wrap in (lambda m: m, torch.compile):
        patched = moe_patch.apply(copy.deepcopy(stock))
        patched.zero_grad(set_to_none=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = wrap(patched)(input_ids=ids, labels=ids).loss
            loss.backward()
        # a compiler failure would fall back to the eager function with a warning: equal, but not the compiled path
        assert not [w for w in caught if "torch.compile of" in str(w.message)], [str(w.message) for w in caught]
        assert rel_err(loss, ref) < 1e-5
        for name in ("model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.q_norm.weight"):
            assert rel_err(patched.get_parameter(name).grad, stock.get_parameter(name).grad) < 1e-4, name
    assert compiled._CACHE  # the helpers did go through torch.compile


# --- misuse ----------------------------------------------------------------------------------------------

def _modules(model):
    return list(model.modules())


def test_dense_model_patches_only_what_applies():
    model = moe_patch.apply(build("llama"))
    kinds = {r.kind for r in moe_patch.report(model) if r.status != "skipped"}
    assert kinds == {"attention", "rmsnorm", "loss"}


def test_compiled_model_is_refused_untouched():
    model = build("qwen3_moe")
    before = _modules(model)
    with pytest.raises(moe_patch.UnsupportedModelError, match="torch.compile"):
        moe_patch.apply(torch.compile(model, backend="eager"))
    assert _modules(model) == before and not moe_patch.is_patched(model)


def test_peft_wrapped_model_is_refused_untouched():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build("qwen3_moe"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    before = _modules(model)
    with pytest.raises(moe_patch.UnsupportedModelError, match="PEFT"):
        moe_patch.apply(model)
    assert _modules(model) == before


def test_ddp_wrapped_model_is_refused_untouched(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = build("qwen3_moe")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        before = _modules(model)
        with pytest.raises(moe_patch.UnsupportedModelError, match="model.module"):
            moe_patch.apply(ddp)
        assert _modules(model) == before
    finally:
        dist.destroy_process_group()


def test_quantized_model_is_refused():
    model = build("qwen3_moe")
    model.config.quantization_config = {"quant_method": "bitsandbytes"}
    before = _modules(model)
    with pytest.raises(moe_patch.UnsupportedModelError, match="quantized"):
        moe_patch.apply(model)
    assert _modules(model) == before


def test_accelerate_dispatched_model_is_refused(tmp_path):
    """device_map with offload (accelerate hooks on modules): a clear error, the model untouched and still
    computing as before."""
    from transformers import AutoModelForCausalLM

    build("qwen3_moe").save_pretrained(tmp_path / "ckpt")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", device_map=device_map,
                                                 offload_folder=str(tmp_path / "offload"))
    ids = inputs()
    ref = model(input_ids=ids).logits
    before = _modules(model)
    with pytest.raises(moe_patch.UnsupportedModelError, match="accelerate"):
        moe_patch.apply(model)
    assert _modules(model) == before and not moe_patch.is_patched(model)
    assert rel_err(model(input_ids=ids).logits, ref) == 0


def test_mesh_misuse_and_single_rank_expert_parallel(tmp_path):
    """In one process (gloo, world 1): clear errors for bad meshes / dispatchers, and ep=1 is exact."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    model = build("qwen3_moe")
    before = _modules(model)
    with pytest.raises(moe_patch.MeshError, match="mesh must be a torch.distributed DeviceMesh"):
        moe_patch.apply(model, mesh=object())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        with pytest.raises(moe_patch.MeshError, match="'ep'"):
            moe_patch.apply(model, mesh=init_device_mesh("cpu", (1,), mesh_dim_names=("dp",)))
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("ep",))
        with pytest.raises(moe_patch.PatchError, match="dispatcher"):
            moe_patch.apply(model, mesh=mesh, dispatcher="carrier-pigeon")
        assert _modules(model) == before and not moe_patch.is_patched(model)
        stock = copy.deepcopy(model)
        moe_patch.apply(model, mesh=mesh)
        ids = inputs()
        assert rel_err(model(ids).logits, stock(ids).logits) < 1e-5
        with pytest.raises(moe_patch.PatchError, match="expert-parallel"):
            moe_patch.revert(model)
    finally:
        dist.destroy_process_group()


def test_cli_report_from_a_model_directory(tmp_path):
    import subprocess
    import sys

    build("mixtral").config.save_pretrained(tmp_path)
    out = subprocess.run([sys.executable, "-m", "moe_patch", "report", str(tmp_path / "config.json"), "--all"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "MixtralExperts" in out.stdout and "Linear" in out.stdout
