"""The family matrix: every MoE family of the installed Transformers, built tiny, stock against patched.

Enumeration (nothing hard-coded, so a new Transformers release is picked up by itself):
  - decorated: every class in transformers/models/*/modeling_*.py under `@use_experts_implementation`;
  - undecorated: the other model packages whose configuration declares experts (num_experts, n_routed_experts,
    ...; moe_patch/catalog.py, whose list `moe-patch report` names): MoE families with per-expert nn.Linear lists
    or their own experts layout.
Each family (model package) is built from its configuration class's defaults shrunk generically (SHRINK),
plus a small per-family override table (OVERRIDES) where the generic shrink is not enough, with the model
class its auto mapping gives for causal LM (multimodal ones: their conditional-generation class, fed
input_ids only). check() compares stock against moe_patch.apply(defaults) on a deep copy.

Run by hand: `python tests/matrix.py [package ...]` prints one line per family.
"""
from __future__ import annotations

import copy
import glob
import os
import re

import torch

from moe_patch import catalog

DECORATOR = re.compile(r"^@use_experts_implementation(?:\([^)]*\))?\s*\nclass (\w+)\(", re.M)

SEQ, BATCH, VOCAB = 14, 2, 256
FWD_TOL, GRAD_TOL = 1e-5, 1e-4
GRAD_FLOOR = 1e-3  # a gradient's error is relative to max(its norm, GRAD_FLOOR x the mean gradient norm)


def decorated_experts() -> dict:
    """{model package: [experts class names decorated with @use_experts_implementation]}."""
    out = {}
    for path in sorted(glob.glob(os.path.join(catalog.models_dir(), "*", "modeling_*.py"))):
        with open(path, encoding="utf-8") as f:
            names = DECORATOR.findall(f.read())
        if names:
            out.setdefault(os.path.basename(os.path.dirname(path)), []).extend(names)
    return out


def undecorated_moe() -> list:
    """Model packages with a modeling file and experts in their configuration (moe_patch.catalog, the list
    `moe-patch report` names), but no decorated class."""
    decorated = decorated_experts()
    return [pkg for pkg in catalog.moe_packages() if pkg not in decorated]


def families() -> list:
    return sorted(set(decorated_experts()) | set(undecorated_moe()))


# --- which model type and class a package is tested with --------------------------------------------------

_MAPPINGS = ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
             "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES", "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
             "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES")


def model_class_name(pkg: str):
    """(model_type, class name): the first model type of the package with a causal-LM class, else a
    conditional-generation / image-text-to-text class, else token classification; None: no head to test."""
    from transformers.models.auto import modeling_auto as ma

    types = catalog.model_types(pkg)
    types = sorted(types, key=lambda t: (t != pkg, len(t)))  # the package's own type first
    for mapping in _MAPPINGS:
        names = getattr(ma, mapping, {})
        for mt in types:
            name = names.get(mt)
            if isinstance(name, (tuple, list)):
                name = name[0]
            if name:
                return mt, name
    return (types[0] if types else pkg), None


# --- tiny configs -------------------------------------------------------------------------------------------

# attribute -> value, applied to the configuration and every nested configuration that has the attribute
SHRINK = dict(
    hidden_size=64, intermediate_size=96, moe_intermediate_size=32, expert_intermediate_size=32,
    shared_expert_intermediate_size=48, moe_shared_expert_intermediate_size=48, ffn_hidden_size=96,
    num_hidden_layers=2, num_layers=2, depth=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    num_heads=4, n_heads=4, d_model=64, d_ff=96, d_kv=16,
    vocab_size=VOCAB, max_position_embeddings=128,
    num_experts=8, num_local_experts=8, n_routed_experts=8, moe_num_experts=8,
    num_experts_per_tok=2, moe_k=2, moe_topk=2, top_k=2,
    n_group=2, topk_group=1, n_shared_experts=1, num_shared_experts=1, moe_num_shared_experts=1,
    first_k_dense_replace=1, first_k_dense=1, moe_layer_start_index=0, decoder_sparse_step=1,
    kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
    index_topk=8, index_n_heads=2, index_head_dim=16, sliding_window=8, attention_chunk_size=8,
    linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_conv_kernel_dim=4, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=2,
    mamba_chunk_size=8, chunk_size=8, expand=1,
    # vision / audio towers: built, never fed (text input only)
    out_hidden_size=64, projection_dim=64, num_channels=3, image_size=32, patch_size=8,
)
_LIST_LEN = ("layer_types", "layers_block_type", "mlp_layer_types", "moe_layer_types")
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "image_token_id", "video_token_id",
              "audio_token_id", "image_token_index", "video_token_index", "decoder_start_token_id")

# Per family, applied after SHRINK to the text configuration (a callable gets the configuration).
OVERRIDES: dict = {
    "dots1": dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1),  # defaults are None
    "hunyuan_v1_moe": dict(head_dim=16),  # None by default, derived before the shrink
    "lfm2_moe": dict(num_dense_layers=1, layer_types=["conv", "full_attention"]),
    "step3p7": dict(sliding_window=8),
    "deepseek_v2": dict(num_experts_per_tok=2, n_group=2, topk_group=1),  # None by default
    "zaya": dict(num_experts_per_tok=1),  # the family supports top-1 only
    "mistral_large4": dict(kv_source_layers=[0, 1]),  # one entry per layer (72 by default)
    # per_layer_config is keyed by layer index (the default's full-attention layers 5, 11, ..., 29); the MoE
    # block is off by default; the per-layer input embedding keeps a 262,144 x 256 table unless shrunk
    "gemma4": dict(per_layer_config={"1": {"head_dim": 32}}, enable_moe_block=True, num_experts=8, top_k_experts=2,
                   moe_intermediate_size=32, vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=16),
    "diffusion_gemma": dict(per_layer_config={"1": {"head_dim": 32}}, enable_moe_block=True, num_experts=8,
                            top_k_experts=2, moe_intermediate_size=32),
    # 3-D RoPE: mrope_section (default [12, 10, 10]) sums to qk_rope_head_dim / 2
    "hy_v4_vl": dict(rope_parameters={"rope_theta": 10000.0, "rope_type": "default", "mrope_section": [2, 1, 1]}),
    "glm5_next": dict(qk_rope_head_dim=0, head_dim=0, index_topk=16),  # DSA layers: NoPE, index_topk % index_kpool
    "bailing_hybrid": dict(n_group=1, topk_group=1),  # group-limited top-k over 8 experts
    # 3-D RoPE: mrope_section (default [8, 12, 12]) sums to head_dim x partial_rotary_factor / 2
    "glm4v_moe": dict(rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_type": "default",
                                       "mrope_section": [2, 1, 1]}),
    "ernie4_5_vl_moe": dict(moe_intermediate_size=[32, 16],  # 3-D RoPE sections summing to head_dim / 2
                            rope_parameters={"rope_theta": 500000.0, "rope_type": "default", "mrope_section": [3, 3, 2]}),
    # the sparse (QSA) indexer: all five fields or none; a budget below SEQ so that selection happens
    "qwen4_exp": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
                      indexer_compress_ratio=2),
    # mlp_layer_types and the routed-expert sizes are None by default (read per layer / by the router)
    "deepseek_ocr2": dict(mlp_layer_types=["dense", "sparse"], n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                          topk_group=1),
    # stock's attention defaults have no rope_theta and clip_qkv=None (its forward clamps with both bounds None)
    "dbrx": dict(n_layers=2, attn_config=dict(rope_theta=10000.0, clip_qkv=8.0), ffn_config=dict(moe_top_k=2)),
    # encoder-decoder: both stacks shrunk (their layer counts are not SHRINK attributes)
    "switch_transformers": dict(decoder_start_token_id=0, num_decoder_layers=2),  # its label shift reads the id
    "nllb_moe": dict(encoder_layers=2, decoder_layers=2),
    # (tested through its thinker) the audio encoder: 20 heads by default (head count is not a SHRINK attribute of audio towers)
    "qwen3_omni_moe": dict(audio_config=dict(encoder_attention_heads=4, encoder_layers=1, encoder_ffn_dim=96)),
    # the audio tower's pyramid holds one entry per layer (4): keep 4 layers, shrink their widths
    "muse_spark": dict(audio_config=dict(num_hidden_layers=4, patch_sizes=[2, 2, 2, 2], hidden_sizes=[16, 16, 32, 64],
                                         depths=[1, 1, 1, 1])),
}

# Families that cannot be built tiny or fed text, with the reason. test_matrix fails on an entry the enumeration
# no longer finds; a family it finds that is not here is tested (and fails until it builds or is listed here).
EXCLUDED: dict = {
    # not a text model: nothing to feed input_ids to, no language-model loss
    "vitpose_backbone": "vision backbone (pose estimation): no text input, no auto class with a head",
    "nemotron3_5_transcribe": "speech recognition (audio input, CTC-style head): no text-in causal LM",
    "diffusion_gemma": "diffusion language model: forward(input_ids, labels) returns no loss (needs its own "
                       "noising inputs); its tiny build is in OVERRIDES",
}


def _changes(defaults: dict, cls) -> dict:
    """The keyword arguments that shrink one configuration, given its defaults (to_dict()): SHRINK's
    attributes where the default is an int, layer-pattern lists cut to every layer kind once, dropout off,
    token ids inside the small vocabulary. Properties of the class (derived values) are left to it."""
    def settable(attr):
        return not isinstance(getattr(cls, attr, None), property)

    out = {a: v for a, v in SHRINK.items()
           if a in defaults and type(defaults[a]) is int and settable(a)}
    n_layers = out.get("num_hidden_layers")
    for attr in _LIST_LEN:
        pattern = defaults.get(attr)
        if isinstance(pattern, (list, tuple)) and pattern and settable(attr):
            kinds = list(dict.fromkeys(pattern))  # every layer kind once, in order of first appearance
            n = max(n_layers or 2, len(kinds))
            out[attr] = (kinds * n)[:n]
            if "num_hidden_layers" in defaults:
                out["num_hidden_layers"] = n_layers = n
    if isinstance(defaults.get("mlp_only_layers"), list):
        out["mlp_only_layers"] = []
    for attr, value in defaults.items():
        if "dropout" in attr and isinstance(value, float) and settable(attr):
            out[attr] = 0.0
    for attr in _TOKEN_IDS:
        value = defaults.get(attr)
        if type(value) is int and value >= VOCAB:
            out[attr] = VOCAB - 1 - _TOKEN_IDS.index(attr)
    if "qk_rope_head_dim" in out:  # MLA: RoPE over the rope part only, one key/value head per query head
        out.update({k: v for k, v in (("head_dim", out["qk_rope_head_dim"]),
                                      ("num_key_value_heads", out.get("num_attention_heads", 4))) if k in defaults})
    return out


def tiny_config(pkg: str):
    """The family's configuration built from its class defaults with _changes() applied at every level
    (text, vision, audio sub-configurations given as dicts), then OVERRIDES[pkg] on the text configuration."""
    from transformers import PreTrainedConfig

    _, cls_name = model_class_name(pkg)
    import transformers

    def shrunk(config) -> dict:  # this level's changes, and every nested sub-configuration's, as a dict
        out = _changes(config.to_dict(), type(config))
        for key, value in vars(config).items():
            if isinstance(value, PreTrainedConfig):
                out[key] = {**value.to_dict(), **shrunk(value)}
        return out

    config_class = getattr(transformers, cls_name).config_class
    kwargs = shrunk(config_class())
    override = OVERRIDES.get(pkg, {})
    if isinstance(override, dict):
        text_key = next((k for k in ("text_config", "language_config") if isinstance(kwargs.get(k), dict)), None)
        def merge(into: dict, changes: dict) -> None:  # a dict given for a sub-configuration merges into it
            for key, value in changes.items():
                if isinstance(value, dict) and isinstance(into.get(key), dict) and key != "rope_parameters":
                    merge(into[key], value)
                else:
                    into[key] = value

        for key, value in override.items():
            if isinstance(value, dict) and isinstance(kwargs.get(key), dict) and key != "rope_parameters":
                merge(kwargs[key], value)  # a sub-configuration's entries
            else:
                (kwargs[text_key] if text_key else kwargs)[key] = value
    cfg = config_class(**kwargs)
    if callable(override):
        override(cfg)
    return cfg


def build(pkg: str, seed: int = 0):
    """The tiny model of `pkg` in fp32 with non-trivial values everywhere: some inits are zeros or ones
    (routers, biases, norms, correction biases), which would hide a wrong router or norm."""
    import transformers

    model_type, cls_name = model_class_name(pkg)
    if cls_name is None:
        raise RuntimeError(f"no model class for {model_type} in the auto mappings")
    torch.manual_seed(seed)
    cls = getattr(transformers, cls_name)
    model = cls._from_config(tiny_config(pkg), attn_implementation="sdpa") if cls._supports_sdpa else \
        cls._from_config(tiny_config(pkg))
    model = model.float()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() > 1 and p.float().std() == 0 or "router" in name or name.endswith("gate.weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
        for name, b in model.named_buffers():
            if "correction_bias" in name or "moe_statics" in name:
                b.add_(torch.randn(b.shape, generator=g) * 0.05)
    return model


# --- the check ----------------------------------------------------------------------------------------------

def _rel(a, b, floor=0.0) -> float:
    a, b = a.double(), b.double()
    denom = max(b.norm().item(), floor)
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()


def _inputs(vocab: int, classes: int):
    """input_ids [BATCH, SEQ] and labels with some -100 positions (classes: the head's width; a token
    classifier's labels are classes, not tokens)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (BATCH, SEQ), generator=g)
    labels = ids % classes
    labels[:, :2] = -100
    labels[0, 7] = -100
    labels[1, 9:11] = -100
    return ids, labels


def _logits(out):
    return getattr(out, "logits", None) if not isinstance(out, tuple) else out[0]


def _decoder_inputs(model, ids) -> dict:
    """Encoder-decoder families also get decoder_input_ids (the same tokens) where no labels are given;
    with labels they shift the labels themselves, as in training."""
    return dict(decoder_input_ids=ids) if getattr(model.config, "is_encoder_decoder", False) else {}


def _run(model, ids, labels):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same draws on both sides (router jitter)
    with torch.no_grad():
        logits = _logits(model(input_ids=ids, use_cache=False, **_decoder_inputs(model, ids)))
    torch.manual_seed(0)
    out = model(input_ids=ids, labels=labels, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits, out.loss.detach(), grads


def compare(stock, patched, ids, labels) -> list:
    """The differences between stock and patched runs, as strings (empty: equal within tolerance)."""
    problems = []
    logits_s, loss_s, grads_s = _run(stock, ids, labels)
    logits_p, loss_p, grads_p = _run(patched, ids, labels)
    if logits_s is None or logits_p is None or logits_s.shape != logits_p.shape:
        problems.append("logits missing or of another shape")
    else:
        err = _rel(logits_p, logits_s)
        if not err < FWD_TOL:
            problems.append(f"logits rel. error {err:.1e}")
    err = abs(loss_p.item() - loss_s.item()) / abs(loss_s.item())
    if not err < FWD_TOL:
        problems.append(f"loss {loss_p.item():.6f} vs stock {loss_s.item():.6f}")
    if grads_s.keys() != grads_p.keys():
        problems.append(f"gradients on other parameters: {sorted(grads_s.keys() ^ grads_p.keys())[:4]}")
    norms = [g.double().norm().item() for g in grads_s.values()]
    floor = GRAD_FLOOR * sum(norms) / max(len(norms), 1)
    common = grads_s.keys() & grads_p.keys()
    bad = {n: _rel(grads_p[n], grads_s[n], floor) for n in common}
    bad = {n: e for n, e in bad.items() if not e < GRAD_TOL}
    if bad:
        worst = max(bad, key=bad.get)
        problems.append(f"{len(bad)} gradients off, worst {worst} rel. error {bad[worst]:.1e}")
    return problems


def state_dict_problems(stock, patched) -> list:
    a, b = stock.state_dict(), patched.state_dict()
    if a.keys() != b.keys():
        return [f"state_dict keys differ: {sorted(a.keys() ^ b.keys())[:4]}"]
    out = [f"state_dict {k}: {tuple(a[k].shape)} {a[k].dtype} -> {tuple(b[k].shape)} {b[k].dtype}"
           for k in a if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype]
    out += [f"state_dict {k}: values differ" for k in a if not out and not torch.equal(a[k], b[k])]
    return out[:4]


KINDS = ("attention", "rmsnorm", "linear", "experts", "router", "loss", "mlp")


def check(pkg: str, diagnose: bool = True) -> dict:
    """{'problems': [...], 'patched': {kind: n}, 'by_kind': {kind: [...]}} for one family."""
    import moe_patch

    torch.set_num_threads(1)
    stock = build(pkg)
    vocab = min(stock.get_input_embeddings().num_embeddings, VOCAB)
    with torch.no_grad():
        zeros = torch.zeros(1, 2, dtype=torch.long)
        classes = _logits(stock(input_ids=zeros, use_cache=False, **_decoder_inputs(stock, zeros))).shape[-1]
    ids, labels = _inputs(vocab, classes)
    patched = copy.deepcopy(stock)
    moe_patch.apply(patched)
    report = moe_patch.report(patched)
    counts = {}
    for row in report:
        if row.status != "skipped":
            counts[row.kind] = counts.get(row.kind, 0) + 1
    problems = state_dict_problems(stock, patched)
    problems += compare(stock, patched, ids, labels)
    result = dict(problems=problems, patched=counts, by_kind={},
                  skipped=sorted({f"{r.kind}: {r.reason}" for r in report if r.status == "skipped"
                                  and r.kind in ("experts", "router", "rmsnorm")}))
    if problems and diagnose:  # which kind: apply one kind at a time
        for kind in KINDS:
            one = copy.deepcopy(stock)
            moe_patch.apply(one, **{k: k == kind for k in KINDS})
            found = compare(stock, one, ids, labels)
            if found:
                result["by_kind"][kind] = found
    return result


def _child(pkg, conn) -> None:
    try:
        result = check(pkg)
    except Exception as exc:  # reported per family by the test
        import traceback

        result = dict(error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc(limit=-4))
    conn.send(result)
    conn.close()


def run_all(pkgs, processes: int = 2, timeout: float = 600.0) -> dict:
    """check() for every package, each in a process of its own forked from this one (no re-import, and no
    global state leaks from one family into the next), at most `processes` at a time. Forked from the main
    thread only (a multiprocessing.Pool forks from a helper thread, which can inherit a held lock)."""
    import multiprocessing as mp
    import time
    from multiprocessing.connection import wait

    ctx = mp.get_context("fork")
    todo, running, results = list(pkgs), {}, {}
    while todo or running:
        while todo and len(running) < processes:
            pkg = todo.pop(0)
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(pkg, send), daemon=True)
            proc.start()
            send.close()
            running[recv] = (pkg, proc, time.monotonic())
        for conn in wait(list(running), timeout=5.0):
            pkg, proc, _ = running.pop(conn)
            try:
                results[pkg] = conn.recv()
            except EOFError:
                results[pkg] = dict(error=f"worker died (exit code {proc.join(5) or proc.exitcode})")
            proc.join(5)
        for conn, (pkg, proc, started) in list(running.items()):
            if time.monotonic() - started > timeout:
                proc.kill()
                running.pop(conn)
                results[pkg] = dict(error=f"timed out after {timeout:.0f} s")
    return results


if __name__ == "__main__":
    import sys
    import time

    import moe_patch  # noqa: F401  (imported before the fork)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    pkgs = sys.argv[1:] or [f for f in families() if f not in EXCLUDED]
    t0 = time.time()
    for pkg, res in sorted(run_all(pkgs).items()):
        print(pkg, res if "error" in res else (res["problems"] or "OK", res["patched"], res["by_kind"]), flush=True)
    print(f"{len(pkgs)} families in {time.time() - t0:.0f} s")
