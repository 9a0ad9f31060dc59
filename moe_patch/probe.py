"""Prove a replacement equal to what the model itself computes, before anything is swapped.

Three proofs live here: proven_equal() for module swaps (norms, routers, below), fused_loss_unproven()
for the fused loss, which runs the model class's own forward (see the comment above it), and
experts_proven() for the experts, on a small throw-away copy of the family's own experts module.

Norms and routers are tiny, so for each class we run a throw-away copy of the original (fresh random
weights, on CPU, so it also works for models built on the meta device) against the proposed replacement
on random inputs: fp32 (relative error < 1e-5 on outputs and input gradients) and bf16 (< 2e-2). Results
are cached per (class, spec): one probe per class per process.
"""
from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

_CACHE: dict = {}
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # outputs
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _fresh_copy(module: nn.Module, dtype, device="cpu") -> nn.Module:
    clone = copy.deepcopy(module).to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in list(clone.parameters()) + list(clone.buffers()):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.5 + 0.1)
    return clone.to(device=device, dtype=dtype)


def _outputs(result):
    return [t for t in (result if isinstance(result, tuple) else (result,)) if isinstance(t, torch.Tensor)]


def single_input(module: nn.Module) -> bool:
    """True if forward takes exactly one tensor (gated norms take a second one: not a plain norm)."""
    params = list(inspect.signature(module.forward).parameters.values())
    required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    extra = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) == 1 and len(extra) == 1


def proven_equal(module: nn.Module, factory, in_features: int, key, device="cpu", canon=None,
                 rows=None, row_scales=None) -> str | None:
    """None if factory(copy) matches copy on random inputs, else the reason it does not. GPU kernels are
    proven on `device`; `canon` maps both output lists to a canonical form first (e.g. router pairs);
    `rows(copy, x)` keeps the input rows on which the result is unique (a router's top-k without a tie);
    `row_scales` ([10] floats) multiplies the input rows (a norm's eps only shows on rows of small magnitude)."""
    cache_key = (type(module), key, str(device))
    if cache_key in _CACHE:
        return _CACHE[cache_key]
    reason = None
    try:
        for dtype in (torch.float32, torch.bfloat16):
            stock = _fresh_copy(module, dtype, device)
            new = factory(stock)  # adopts the copy's weights: same weights on both sides
            x = torch.randn(64 if rows else 10, in_features, generator=torch.Generator().manual_seed(1))
            if row_scales is not None:
                x = x * row_scales.reshape(-1, 1)
            x = x.to(device, dtype)
            if rows is not None:
                with torch.no_grad():
                    x = x[rows(stock, x)][:10]
                if len(x) < 10:
                    reason = f"too few probe rows with a unique result ({len(x)} of 64, {dtype})"
                    break
            x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            ra, rb = stock(x1), new(x2)
            if isinstance(ra, tuple) != isinstance(rb, tuple):  # a bare tensor for a 1-tuple: not what callers read
                reason = f"outputs differ in structure ({type(ra).__name__} against {type(rb).__name__}, {dtype})"
                break
            a, b = _outputs(ra), _outputs(rb)
            if canon is not None and len(a) == len(b):
                a, b = canon(a), canon(b)
            if len(a) != len(b) or any(p.dtype != q.dtype or p.shape != q.shape for p, q in zip(a, b)):
                reason = f"outputs differ in number, dtype or shape ({dtype})"
                break
            for p, q in zip(a, b):
                if not p.is_floating_point():
                    if not torch.equal(p, q):
                        reason = f"integer outputs differ ({dtype})"
                    continue
                err = rel_err(q, p)
                if err > TOL[dtype]:
                    reason = f"output rel. error {err:.1e} > {TOL[dtype]:.0e} ({dtype})"
            if reason:
                break
            loss_a = sum((t.float() * 0.37).sum() for t in a if t.is_floating_point())
            loss_b = sum((t.float() * 0.37).sum() for t in b if t.is_floating_point())
            (ga,) = torch.autograd.grad(loss_a, x1)
            (gb,) = torch.autograd.grad(loss_b, x2)
            err = rel_err(gb, ga)
            if err > GRAD_TOL[dtype]:
                reason = f"input-gradient rel. error {err:.1e} ({dtype})"
                break
    except Exception as exc:  # a probe must never take the host program down: report it instead
        reason = f"probe failed: {type(exc).__name__}: {exc}"
    _CACHE[cache_key] = reason
    return reason


# --- the model's own head path: the fused loss ---------------------------------------------------------
#
# The fused loss replaces one thing in the root model's forward: the call to `self.loss_function(logits,
# labels, ...)`, which it answers from the decoder's last hidden state and lm_head's weight instead of the
# logits (ops/loss.py). That is the model's loss only if the model's own forward feeds the decoder's output
# straight into lm_head and the logits straight into that call, with no transform between (a width
# multiplier, a softcap, a logit scale, a vocabulary slice, an extra norm) and with Transformers' causal-LM
# loss. Whether it does is decided by running the root class's own forward, not by reading names: a
# throw-away instance of the same class, built on the meta device from a copy of the config with a small
# vocabulary and one decoder layer, whose decoder is replaced by a stub returning chosen hidden states (and
# router logits, so the aux-loss term runs too); only lm_head and any other root-level modules are
# materialised. Stock forward and fused forward are compared there at two logit scales (init-like and
# trained-like, where a softcap or multiplier shows), with -100 labels, with and without
# num_items_in_batch: the loss and the gradients of the hidden states, router logits and root parameters.
# The result is cached by the model's class and a fingerprint of its config and scalar attributes, which
# the fused forward recomputes at each call: a switch a user flips after apply() is proven again.

PROBE_VOCAB = 96
PROBE_MAX_PARAMS = 50_000_000  # root-level parameters materialised for the proof (lm_head is PROBE_VOCAB rows)
LOGIT_STDS = (1.0, 12.0)  # logits' standard deviation: init-like, and trained-like (|logit| up to ~40)
_SCALAR = (bool, int, float, str, type(None))
_LOSS_CACHE: dict = {}


def _configs(cfg) -> list:
    """cfg and every config nested in it (text_config, ...), each once."""
    from transformers.configuration_utils import PreTrainedConfig

    out, todo = [], [cfg]
    while todo:
        c = todo.pop()
        if any(c is o for o in out):
            continue
        out.append(c)
        todo += [v for v in vars(c).values() if isinstance(v, PreTrainedConfig)]
    return out


def _scalars(obj, skip=()) -> tuple:
    """(name, value) of obj's public attributes holding a scalar or a list of scalars, in attribute order."""
    items = []
    for k, v in vars(obj).items():
        if k[0] == "_" or k in skip:
            continue
        if type(v) in (list, tuple):
            if not all(isinstance(x, _SCALAR) for x in v):
                continue
            v = tuple(v)
        elif not isinstance(v, _SCALAR):
            continue
        items.append((k, v))
    return tuple(items)


def head_fingerprint(model, cls=None) -> tuple:
    """What the head path can depend on and a user can change after apply(): the class, every (nested)
    config's public scalar fields, and the root model's public scalar attributes (router_aux_loss_coef, ...).
    A few tens of microseconds: computed at every fused-loss forward. `cls`: the model's class as it was at
    apply() (FSDP2's fully_shard swaps the instance's class for a subclass of it)."""
    return (cls or type(model), tuple(_scalars(c) for c in _configs(model.config)), _scalars(model, ("training",)))


def _shrunk_config(model, one_layer: bool):
    """A copy of the config with a PROBE_VOCAB vocabulary (other vocabulary sizes, e.g. an unpadded one,
    scaled alike; token ids kept inside it) and, with one_layer, one decoder layer (per-layer lists cut)."""
    cfg = copy.deepcopy(model.config)
    for c in _configs(cfg):
        fields = vars(c)
        vocab = fields.get("vocab_size")
        if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > PROBE_VOCAB:
            for k, v in list(fields.items()):
                if k == "vocab_size" or isinstance(v, bool):
                    continue
                if "vocab" in k and isinstance(v, int) and 0 < v <= vocab:
                    setattr(c, k, max(1, v * PROBE_VOCAB // vocab))
                elif k.endswith(("token_id", "token_ids")) and isinstance(v, int):
                    setattr(c, k, v % PROBE_VOCAB)
                elif k.endswith(("token_id", "token_ids")) and isinstance(v, (list, tuple)):
                    setattr(c, k, type(v)(x % PROBE_VOCAB if isinstance(x, int) else x for x in v))
            c.vocab_size = PROBE_VOCAB
        layers = fields.get("num_hidden_layers")
        if one_layer and isinstance(layers, int) and layers > 1:
            for k, v in list(fields.items()):
                if isinstance(v, (list, tuple)) and len(v) == layers:
                    setattr(c, k, type(v)(v[:1]))
            c.num_hidden_layers = 1
    return cfg


def _stub_output_class():
    from transformers.modeling_outputs import MoeModelOutputWithPast

    class StubOutput(MoeModelOutputWithPast):
        """The decoder's output as the root forward reads it; fields it lacks read None."""

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return None

    return StubOutput


class _StubDecoder(nn.Module):
    """Stands in for the decoder: returns the hidden states (and router logits) set on it."""

    def __init__(self):
        super().__init__()
        self.hidden, self.router_logits, self.output = None, None, _stub_output_class()

    def forward(self, *args, **kwargs):
        return self.output(last_hidden_state=self.hidden, router_logits=self.router_logits)


def _num_experts(model) -> int | None:
    """Experts per MoE layer, as the model's aux loss counts them: the config's count first (an expert-parallel
    model's experts modules hold only this rank's experts), else a fused 3D experts module's."""
    for c in _configs(model.config):
        for attr in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
            value = vars(c).get(attr)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    for module in model.modules():
        params3d = [p for p in module.parameters(recurse=False) if p.dim() == 3]
        if len(params3d) >= 2 and len({p.shape[0] for p in params3d}) == 1:
            return params3d[0].shape[0]
    return None


def _tiny_root(model, cls):
    """(the throw-away instance, its stub decoder); raises if the class cannot be built that way."""
    errors = []
    for one_layer in (True, False):  # one layer first: the meta build of a deep model takes seconds
        try:
            cfg = _shrunk_config(model, one_layer)
            for c in _configs(cfg):  # the decoder is never run: eager builds everywhere
                try:
                    c._attn_implementation = "eager"
                except Exception:  # noqa: BLE001 - a config without the setter builds as it is
                    pass
            from . import auto

            with torch.device("meta"), auto.suspended():  # never auto-patched (MOE_PATCH=1)
                tiny = cls(cfg)
            break
        except Exception as exc:  # noqa: BLE001 - reported by the caller if no attempt builds
            errors.append(f"{type(exc).__name__}: {exc}")
    else:
        raise RuntimeError("could not build a small instance: " + " / ".join(errors))
    prefix = getattr(tiny, "base_model_prefix", None)
    if not prefix or not isinstance(getattr(tiny, prefix, None), nn.Module):
        raise RuntimeError("no decoder under base_model_prefix")
    stub = _StubDecoder()
    setattr(tiny, prefix, stub)
    size = sum(p.numel() for p in tiny.parameters())
    if size > PROBE_MAX_PARAMS:
        raise RuntimeError(f"{size:,} root-level parameters besides the decoder")
    tiny.to_empty(device="cpu").float()
    # attributes set on the model after it was built (model.router_aux_loss_coef = 0.0, ...) are set on the
    # copy too; those still mirroring the config's field (vocab_size, ...) keep the copy's (shrunk) value
    from_config = {}
    for c in reversed(_configs(model.config)):  # the outer config's value wins
        from_config.update(vars(c))
    for k, v in _scalars(model, ("training",)):
        if hasattr(tiny, k) and (k not in from_config or from_config[k] != v):
            setattr(tiny, k, v)
    return tiny, stub


def _head_path_errors(tiny, stub, fused, hidden_size: int, experts: int | None) -> str | None:
    g = torch.Generator().manual_seed(0)
    params = [p for p in tiny.parameters()]
    head = tiny.lm_head
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 0.1)
    accepts = inspect.signature(type(tiny).forward).parameters
    batch, seq = 2, 10
    ids = torch.randint(0, PROBE_VOCAB, (batch, seq), generator=g)
    labels = torch.randint(0, PROBE_VOCAB, (batch, seq), generator=g)
    labels[0, :3] = -100
    labels[1, 6:8] = -100
    calls = [{}, {"num_items_in_batch": torch.tensor(11)}]
    if experts and "output_router_logits" in accepts:  # the aux-loss term on, with the Trainer's normaliser
        calls[1]["output_router_logits"] = True
    for std in LOGIT_STDS:
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * (std / hidden_size ** 0.5))
        hidden = torch.randn(batch, seq, hidden_size, generator=g)
        router = tuple(torch.randn(batch * seq, experts, generator=g) for _ in range(2)) if experts else None
        for kwargs in calls:
            results = []
            for forward in (type(tiny).forward.__get__(tiny), fused):
                stub.hidden = hidden.clone().requires_grad_()
                stub.router_logits = tuple(r.clone().requires_grad_() for r in router) if router else None
                loss = forward(input_ids=ids, labels=labels, **kwargs).loss
                leaves = [stub.hidden, *(stub.router_logits or ()), *params]
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                results.append((loss, [torch.zeros_like(t) if d is None else d for t, d in zip(leaves, grads)]))
            (ref, ref_grads), (out, out_grads) = results
            where = f"logit std {std:g}, {', '.join(kwargs) or 'mean over tokens'}"
            err = rel_err(out, ref)
            if not err <= TOL[torch.float32]:
                return f"loss differs from the model's own forward (rel. error {err:.1e}; {where})"
            names = ["hidden states"] + ["router logits"] * (len(leaves) - 1 - len(params)) + \
                [n for n, _ in tiny.named_parameters()]
            for name, a, b in zip(names, out_grads, ref_grads):
                err = rel_err(a, b) if b.norm() > 0 else a.norm().item()
                if not err <= GRAD_TOL[torch.float32]:
                    return f"gradient of {name} differs from the model's own forward (rel. error {err:.1e}; {where})"
    return None


def fused_loss_unproven(model, make_fused, cls=None) -> str | None:
    """None if `make_fused(instance)` (a forward taking input_ids / labels / ... like the model's) gives the
    model's own loss and gradients on its class's head path, else why not (see the comment above).
    Cached by head_fingerprint(model, cls); cls defaults to type(model)."""
    cls = cls or type(model)
    key = head_fingerprint(model, cls)
    if key in _LOSS_CACHE:
        return _LOSS_CACHE[key]
    try:
        tiny, stub = _tiny_root(model, cls)
        tiny.train()
        hidden_size = tiny.lm_head.weight.shape[1]
        reason = _head_path_errors(tiny, stub, make_fused(tiny), hidden_size, _num_experts(model))
    except Exception as exc:  # a probe never takes the program down: the stock loss stays
        # the model's own forward (or the fused one) failed on the proof's small inputs: nothing proven, so the
        # fused loss is not used; say that first, the error after it (a bare "too many values to unpack" says
        # nothing about the loss to someone reading the report)
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        reason = (f"fused loss not used: its proof could not run this model's forward on small inputs "
                  f"({type(exc).__name__}{': ' + detail if detail else ''}); the model's own loss stays")
    _LOSS_CACHE[key] = reason
    return reason

# --- experts -------------------------------------------------------------------------------------------------

EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
PROBE_EXPERTS = 3  # experts in the throw-away copy: the map is the same per expert, so a few prove it


def _small_experts_copy(module: nn.Module, device, dtype) -> nn.Module:
    """A copy of an experts module cut to PROBE_EXPERTS experts with fresh random weights (the widths stay:
    an expert's map is what is proven). Never copies the module's own (possibly huge, possibly meta)
    weights: each stacked parameter [E, ...] becomes a new [PROBE_EXPERTS, ...] tensor; submodules (a
    post-expert norm) are deep-copied with fresh values."""
    num = next(iter(_three_d(module).values())).shape[0]
    keep = min(num, PROBE_EXPERTS)
    clone = copy.copy(module)
    clone._parameters, clone._buffers = {}, {}
    clone._modules = {n: _fresh_copy(m, dtype, device) for n, m in module._modules.items()}
    g = torch.Generator().manual_seed(0)
    for name, p in module._parameters.items():
        if p is None:
            clone._parameters[name] = None
            continue
        shape = (keep, *p.shape[1:]) if p.dim() >= 2 and p.shape[0] == num else tuple(p.shape)
        value = torch.randn(shape, generator=g) * 0.3 + 0.02
        clone._parameters[name] = nn.Parameter(value.to(device, dtype), requires_grad=True)
    for name, b in module._buffers.items():
        clone._buffers[name] = None if b is None else torch.zeros(b.shape, dtype=b.dtype).to(device)
    for attr in EXPERT_COUNT_ATTRS:  # the stock forward loops / one-hots over its expert count
        if getattr(module, attr, None) == num:
            object.__setattr__(clone, attr, keep)
    clone.train()
    return clone


def _three_d(module):
    return {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3}


def _experts_proof_dtypes(module: nn.Module, device) -> list:
    """(dtype, routing-weights dtype) pairs the experts proof runs: fp32 always (the map itself); bf16 with
    bf16 and fp32 routing weights on a GPU, or where the module's own weights are half precision. An fp32 CPU
    module (a model planned on CPU or on the meta device) skips bf16: CPU bf16 grouped GEMMs are not the GPU's
    kernels, and at real widths (Mixtral: 4096 x 14336) the extra passes cost GBs of memory and tens of
    seconds; apply() on the GPU proves bf16 there."""
    pairs = [(torch.float32, torch.float32)]
    half = any(p.dtype in (torch.bfloat16, torch.float16) for p in module.parameters())
    if torch.device(device).type == "cuda" or half:
        pairs += [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
    return pairs


def experts_proven(module: nn.Module, factory, key, device="cpu", fp8_tol=None) -> str | None:
    """None if `factory(copy)` computes what the family's own experts module computes, else the reason.

    The family's module (as configured: Transformers' experts implementation in use included) and the
    replacement run on one small copy (_small_experts_copy) with the same Parameter objects, on routed
    tokens that hit every expert but one (an empty group), top-k without repeats, in fp32 (relative error
    < 1e-5 outputs, < 1e-4 gradients of the hidden states, the routing weights and every parameter) and, on a
    GPU or for half-precision weights, in bf16 with bf16 and with fp32 routing weights (< 2e-2; see
    _experts_proof_dtypes). Cached per (class, key, device).

    fp8_tol=(outputs, gradients): the FP8 experts (ops/fp8_experts.py) against the family's module in bf16,
    bf16 passes only, with those relative-error bounds (FP8's own, fp8_experts.FP8_TOL); the replacement
    must have taken its FP8 kernels (a silent bf16 run would prove nothing about them)."""
    cache_key = (type(module), "experts", key, str(device), fp8_tol)
    if cache_key in _CACHE:
        return _CACHE[cache_key]
    reason = None
    try:
        pairs = _experts_proof_dtypes(module, device)
        if fp8_tol is not None:
            pairs = [pair for pair in pairs if pair[0] == torch.bfloat16]
            if not pairs:
                raise RuntimeError("the FP8 proof runs in bf16 on a GPU only")
        for dtype, weights_dtype in pairs:
            stock = _small_experts_copy(module, device, dtype)
            new = factory(stock)  # adopts the copy's parameters
            try:
                reason = _compare_experts(stock, new, dtype, weights_dtype, device, fp8_tol)
                cache = getattr(new, "_fp8_cache", None)
                if reason is None and fp8_tol is not None and not (cache and cache.quantisations):
                    reason = "the FP8 kernels did not run on the proof's input"
            except _StockRaised:
                if dtype == weights_dtype:
                    raise
                reason = None  # the family's module takes no fp32 routing weights with bf16 states: not its input
            if reason:
                break
    except Exception as exc:  # a probe must never take the host program down: report it instead
        reason = f"probe failed: {type(exc).__name__}: {exc}"
    _CACHE[cache_key] = reason
    return reason


class _StockRaised(RuntimeError):
    """The family's own experts module raised on the probe's input."""


def _hidden_width(module) -> int:
    down = module._parameters["down_proj"]
    return down.shape[-1] if getattr(module, "is_transposed", False) else down.shape[-2]


def _compare_experts(stock, new, dtype, weights_dtype, device, fp8_tol=None) -> str | None:
    num = next(iter(_three_d(stock).values())).shape[0]
    top_k = min(2, max(num - 1, 1))
    tokens = 16
    g = torch.Generator().manual_seed(1)
    used = max(num - 1, top_k)  # the last expert gets no token where there are enough experts
    idx = torch.stack([torch.randperm(used, generator=g)[:top_k] for _ in range(tokens)])
    # token scales from 0.1 to 10: small values and a trained model's large activations, where a value-dependent
    # quirk of the family's forward (a clamp, a cap) shows
    x = torch.randn(tokens, _hidden_width(stock), generator=g) * torch.logspace(-1, 1, tokens)[:, None]
    w = torch.rand(tokens, top_k, generator=g) + 0.1
    x, w, idx = x.to(device, dtype), w.to(device, weights_dtype), idx.to(device)
    params = [p for p in stock.parameters() if p.requires_grad]
    results = []
    for module in (stock, new):
        x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
        try:
            out = _outputs(module(x1, idx, w1))[0]
        except Exception as exc:
            if module is stock:
                raise _StockRaised(f"{type(exc).__name__}: {exc}") from exc
            raise
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device, out.dtype)
        grads = torch.autograd.grad(out, [x1, w1, *params], gout, allow_unused=True)
        results.append((out.detach(), grads))
    (a, ga), (b, gb) = results
    tol, grad_tol = fp8_tol or (TOL[dtype], GRAD_TOL[dtype])
    tag = f"{'fp8 against ' if fp8_tol else ''}{dtype}, {weights_dtype} routing weights"
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"output {tuple(b.shape)} {b.dtype} instead of {tuple(a.shape)} {a.dtype} ({tag})"
    err = rel_err(b, a)
    if not err < tol:
        return f"output rel. error {err:.1e} > {tol:.0e} ({tag})"
    names = ["hidden states", "routing weights"] + [n for n, p in stock.named_parameters() if p.requires_grad]
    for name, p, q in zip(names, ga, gb):
        if (p is None) != (q is None):
            return f"gradient of {name} {'missing' if q is None else 'unexpected'} ({tag})"
        if p is not None and not rel_err(q, p) < grad_tol:
            return f"gradient of {name}: rel. error {rel_err(q, p):.1e} ({tag})"
    return None
