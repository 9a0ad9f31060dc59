"""Fused linear + cross-entropy: in training with labels, the (tokens, vocab) logits are never built.

The causal-LM's forward gets an instance-level wrapper (the class is untouched; revert() deletes it).
When the model is training and `labels` are given, the wrapper runs the model's own forward with
logits_to_keep=1 (so the stock lm_head sees one position) and answers its `self.loss_function(...)` call
from the decoder's last hidden state (captured by a hook) and lm_head's weight:
  torch backend: large chunks of rows (1 to 4 GiB of logits each, by the GPU's memory: chunk_bytes), gradients
    computed in the forward (_ChunkedLinearCrossEntropy); each chunk's softmax gradient is a torch.compile'd
    function, or on a GPU with Liger-Kernel installed Liger's cross-entropy kernel, once proven equal to it there;
  liger backend: Liger-Kernel's fused linear cross-entropy (Triton; small chunks, so its weight-gradient
  accumulation dominates at large vocabularies).
Both follow Transformers' ForCausalLMLoss exactly: labels shifted by one, ignore_index, logits upcast to
fp32 for the softmax, "sum / num_items_in_batch" when the Trainer passes num_items_in_batch, else the mean
over non-ignored tokens. The rest of the forward (the router aux-loss term with the coefficient and switches
as set now, the outputs) is the model's own code. That this is the model's loss is proven at apply time on
the class's own forward (probe.fused_loss_unproven) and checked again at each call (FusedLossForward).
Effect on outputs: in that training case `outputs.logits` is None (as with Liger's own patches), and
the KV cache too unless `use_cache=True` is passed (stock fills a KV cache nobody reads in training), except where
position_ids are given without an attention_mask (with no cache Transformers would mask packed sequences apart,
which stock with its cache does not: the cache is left as stock has it); in eval
or without labels the stock forward runs unchanged and returns logits.
"""
from __future__ import annotations

import functools
import inspect
import warnings

import torch
import torch.nn.functional as F

from . import compiled

IGNORE = -100
# Rows per chunk: as many as keep one chunk's logits near chunk_bytes(). Large chunks keep the weight-gradient
# accumulation (a read and write of the whole [vocab, hidden] gradient per chunk) to a handful of passes and the
# input-gradient GEMM ([rows, hidden] out) at several waves of tiles; small ones keep the transient logits and
# their gradient small. CHUNK_BYTES is the floor (and the cap off CUDA); on a GPU the cap grows with its memory,
# 1/32 of it up to MAX_CHUNK_BYTES. Measured on an H200 (139 GiB: 4 GiB chunks), the fused loss forward +
# backward (benchmarks/loss_chunks.py, bf16, two runs): GPT-OSS-20B's head (vocab 201,088, hidden 2,880, 8,192
# rows) 46.2-46.5 -> 44.3-44.9 ms (one chunk instead of four), Qwen3-30B-A3B's (151,936 x 2,048, 16,384 rows)
# 48.7-50.8 -> 47.8-48.2 ms, for 1.5 / 2.8 GiB more transient memory; deepseek-v3-style's (102,400 x 2,048)
# no gain (32.4-32.5 -> 32.5-33.1 ms).
CHUNK_BYTES = 1 << 30
MAX_CHUNK_BYTES = 4 << 30


def chunk_bytes(device: torch.device | str | None = None) -> int:
    """The logits bytes one chunk may hold on `device`: CHUNK_BYTES off CUDA; on a GPU 1/32 of its memory,
    between CHUNK_BYTES and MAX_CHUNK_BYTES (an 80 GB GPU: 2.3 GiB; a 24 GB one: 1 GiB)."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        return CHUNK_BYTES
    total = torch.cuda.get_device_properties(device).total_memory
    return max(CHUNK_BYTES, min(MAX_CHUNK_BYTES, total // 32))


def chunk_rows(vocab: int, itemsize: int, total: int | None = None, device=None) -> int:
    """Rows per chunk: at most chunk_bytes(device) of logits (whole 256-row GEMM tiles where that is >= 256 rows);
    with `total` rows to cover, the same number of chunks made equal instead of full ones and a small remainder
    (GPT-OSS-20B's 8,190 rows at 1 GiB: 4 x 2,048, not 3 x 2,560 + 510): a remainder chunk runs its three GEMMs
    far below the full ones' rate (H200: ~660 against ~800 TFLOP/s) and, in the weight gradient, still reads and
    writes the whole [vocab, hidden] accumulator. Sizes in rows; the logits of one chunk stay under the cap plus
    one tile of rows."""
    cap = max(1, chunk_bytes(device) // (vocab * itemsize))
    cap = cap - cap % 256 if cap >= 256 else cap  # whole GEMM tiles
    if not total or total <= cap:
        return cap
    chunks = -(-total // cap)
    rows = -(-total // chunks)
    return rows + (-rows) % 256 if rows >= 256 else rows  # rounded up to whole tiles: still `chunks` chunks


# config attributes known to transform logits after lm_head: a fast "no" before any proof. Not the gate:
# a transform under another name is found by the proof (probe.fused_loss_unproven).
LOGIT_TRANSFORMS = ("logits_scaling", "final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def why_not(model) -> str | None:
    """The reason the fused loss cannot fit this model, seen without running anything; None says only that
    the proof (probe.fused_loss_unproven) is to decide."""
    head = getattr(model, "lm_head", None)
    if type(head) is not torch.nn.Linear:
        return "no nn.Linear lm_head"
    params = inspect.signature(type(model).forward).parameters
    if "labels" not in params or "logits_to_keep" not in params:
        return "forward takes no labels / logits_to_keep"
    cfg = getattr(model, "config", None)
    for attr in LOGIT_TRANSFORMS:
        value = getattr(cfg, attr, None)
        if value not in (None, 1, 1.0, 0, 0.0):
            return f"config.{attr}={value} transforms logits after lm_head"
    if getattr(model, "base_model_prefix", None) is None or not hasattr(model, model.base_model_prefix):
        return "no base model to take the hidden states from"
    return None


def _ce_and_grad(logits, labels):
    """Sum of cross-entropies of one chunk and d(sum)/d(logits) = softmax - onehot (0 on ignored rows),
    softmax in fp32, gradient returned in the logits dtype. Pointwise + one row reduction: on GPU it is
    compiled into a couple of fused kernels (compiled.py)."""
    logits32 = logits.float()
    valid = labels != IGNORE
    target = torch.where(valid, labels, 0)
    lse = torch.logsumexp(logits32, dim=-1)
    loss = ((lse - logits32.gather(1, target[:, None]).squeeze(1)) * valid).sum()
    onehot = torch.arange(logits.shape[-1], device=logits.device)[None, :] == target[:, None]
    grad = (torch.exp(logits32 - lse[:, None]) - onehot.float()) * valid[:, None]
    return loss, grad.to(logits.dtype)


def _compiled_step(logits, labels):
    return compiled.run(_ce_and_grad, logits, labels)


def _liger_step(logits, labels):
    """_ce_and_grad in Liger-Kernel's cross-entropy kernel: one program per row, an online softmax in fp32
    (one read of the row) and the gradient written over the logits (no second [rows, vocab] buffer). Its
    launch is fixed, where inductor's autotuned reduction for _ce_and_grad measured 1.6 to 2.9 ms per 1 GiB
    chunk on H200 from one run to the next (CHANGELOG 0.4.0). Per-row losses are kept in fp32."""
    import triton
    from liger_kernel.ops.cross_entropy import MAX_FUSED_SIZE, liger_cross_entropy_kernel

    rows, vocab = logits.shape
    losses = torch.zeros(rows, dtype=torch.float32, device=logits.device)
    liger_cross_entropy_kernel[(rows,)](
        X_ptr=logits, X_stride=logits.stride(-2), Y_ptr=labels, Y_stride=labels.stride(-1), weight_ptr=None,
        loss_ptr=losses, z_loss_ptr=None, loss_stride=losses.stride(-1), token_accuracy_ptr=None,
        token_accuracy_stride=0, predicted_tokens_ptr=None, predicted_tokens_stride=0, n_cols=vocab,
        n_non_ignore=1, sum_non_ignore_weight=1, weight_sum=0.0, ignore_index=IGNORE, lse_square_scale=0.0,
        label_smoothing=0.0, reduction="sum", softcap=None, RETURN_Z_LOSS=False, RETURN_TOKEN_ACCURACY=False,
        RETURN_PREDICTED_TOKENS=False, BLOCK_SIZE=min(MAX_FUSED_SIZE, triton.next_power_of_2(vocab)),
        HAS_WEIGHT=False, HAS_SOFTCAPPING=False, HAS_GRADIENTS=True, num_warps=32)
    return losses.sum(), logits


STEPS = {"compiled": _compiled_step, "liger": _liger_step}
_PROVEN: dict = {}


def liger_step_unproven(device: torch.device) -> str | None:
    """None if Liger's kernel gives _ce_and_grad's loss and logits gradient on `device` (fp32 and bf16, rows
    ignored or not, a vocabulary over one kernel block), else why not: the kernel's arguments are Liger's
    internals and may change between its versions, so it is proven before use, once per process."""
    key = str(device)
    if key not in _PROVEN:
        _PROVEN[key] = _prove_liger_step(device)
    return _PROVEN[key]


def _prove_liger_step(device):
    from .. import probe

    try:
        g = torch.Generator(device=device).manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16):
            logits = (torch.randn(48, 40_000, device=device, generator=g) * 3).to(dtype)
            labels = torch.randint(0, 40_000, (48,), device=device, generator=g)
            labels[::5] = IGNORE
            ref_loss, ref_grad = _ce_and_grad(logits.clone(), labels)
            loss, grad = _liger_step(logits.clone(), labels)
            errs = (probe.rel_err(loss, ref_loss), probe.rel_err(grad, ref_grad))
            if grad.dtype != ref_grad.dtype or errs[0] > probe.TOL[dtype] or errs[1] > probe.GRAD_TOL[dtype]:
                return f"Liger's cross-entropy kernel differs (loss {errs[0]:.1e}, gradient {errs[1]:.1e}, {dtype})"
    except Exception as exc:  # a probe never takes the program down: the compiled step stays
        return f"Liger's cross-entropy kernel failed: {type(exc).__name__}: {exc}"
    return None


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of token cross-entropies of (hidden @ weight.T + bias), chunk by chunk of rows.

    Like Liger's kernel, the gradients are computed during the forward (each chunk's logits exist only
    once, briefly) and the backward only scales them; unlike it, the chunks are large (chunk_rows()),
    so the weight gradient is accumulated a handful of times instead of once per small chunk. Logits are
    computed in the input dtype and the softmax in fp32, as Transformers' ForCausalLMLoss does. The weight
    gradient accumulates in place in the weight's dtype (the GEMM itself accumulates in fp32), as Liger's
    does: an fp32 accumulator would hold another [vocab, hidden] fp32 tensor at the step's memory peak.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ce_step):
        needs = ctx.needs_input_grad
        grad_hidden = torch.empty_like(hidden) if needs[0] else None
        grad_weight = None  # the first chunk's product starts it (no memset of a [vocab, hidden] tensor)
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if bias is not None and needs[2] \
            else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        step = chunk_rows(weight.shape[0], hidden.element_size(), hidden.shape[0], hidden.device)
        for start in range(0, hidden.shape[0], step):
            h, y = hidden[start:start + step], labels[start:start + step]
            loss, grad = ce_step(F.linear(h, weight, bias), y)
            total += loss
            if grad_hidden is not None:
                grad_hidden[start:start + step] = grad @ weight
            if needs[1]:
                if grad_weight is None:
                    grad_weight = (grad.t() @ h).to(weight.dtype)
                elif grad_weight.dtype == grad.dtype == h.dtype:
                    grad_weight.addmm_(grad.t(), h)  # in place: no [vocab, hidden] temporary
                else:  # mixed dtypes (autocast over fp32 weights): matmul in the autocast dtype
                    grad_weight += grad.t() @ h
            if grad_bias is not None:
                grad_bias += grad.float().sum(0)
        if needs[1] and grad_weight is None:  # no rows at all
            grad_weight = torch.zeros_like(weight)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        # grad_out (1 / tokens, typically) multiplies in fp32: rounded to bf16 it would scale every gradient
        return (compiled.run(_scaled, grad_hidden, grad_out) if grad_hidden is not None else None,
                compiled.run(_scaled, grad_weight, grad_out).to(w_dtype) if grad_weight is not None else None,
                (grad_bias * grad_out).to(b_dtype) if grad_bias is not None else None,
                None, None)


def _packing_found_without_cache(args, kwargs) -> bool:
    """Whether dropping the KV cache could change the attention mask: Transformers looks for packed sequences in
    position_ids (and masks across them) only when the 2-D attention_mask is None and there is no cache
    (masking_utils._preprocess_mask_arguments), and stock builds a cache in training where config.use_cache is
    set. There the cache is left as stock would have it, so the mask is stock's (a packed batch attends across
    its sequences under stock's defaults, and so it does here)."""
    if len(args) > 1:  # attention_mask / position_ids given by position: not read here, so keep stock's cache
        return True
    return kwargs.get("position_ids") is not None and kwargs.get("attention_mask") is None


def _scaled(grad, scale):
    """grad * scale in fp32, rounded once to grad's dtype. Compiled on GPU: eager, a bf16 tensor times an
    fp32 scalar tensor takes torch's non-vectorised mixed-dtype kernel (1.2 ms for lm_head's gradient)."""
    return (grad.float() * scale).to(grad.dtype)


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on the fused loss's sum; its backward refuses create_graph=True. Both backends compute the
    gradients in the forward (Liger's kernel likewise): constants to autograd, so differentiated again they would
    silently miss the loss's second derivative (Hessian-vector products, gradient penalties, AdaHessian).
    (once_differentiable does not catch it: the incoming gradient, 1 / tokens, does not require grad.)"""

    @staticmethod
    def forward(ctx, total):
        return total.view_as(total)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # backward(create_graph=True): a second derivative is wanted
            raise RuntimeError("moe_patch: the fused linear + cross-entropy loss has no second derivative "
                               "(backward with create_graph=True); apply(model, loss=False) keeps the model's own "
                               "loss")
        return grad


def _chunked_sum(hidden, weight, bias, labels, step="compiled"):
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, STEPS[step])


def _liger_sum(hidden, weight, bias, labels, step=None):
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")(weight, hidden, labels, bias)


def causal_lm_loss(hidden, head, labels, backend, num_items_in_batch=None, shift_labels=None, step="compiled",
                   ignore_index=IGNORE):
    """Transformers' ForCausalLMLoss of head(hidden) without the logits: hidden [batch, seq, H] (any float
    dtype), head an nn.Linear [V, H], labels [batch, seq] int64 (shifted by one here unless shift_labels is
    given; `ignore_index` positions ignored). Returns a 0-d fp32 tensor: the sum over tokens divided by
    num_items_in_batch if given, else the mean over non-ignored tokens."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    shift_labels = shift_labels.reshape(-1).to(hidden.device)
    if ignore_index != IGNORE:  # the kernels know -100 only
        shift_labels = torch.where(shift_labels == ignore_index, IGNORE, shift_labels)
    total = (_liger_sum if backend == "liger" else _chunked_sum)(hidden, head.weight, head.bias, shift_labels, step)
    total = _FirstOrderOnly.apply(total)
    n_valid = (shift_labels != IGNORE).sum()
    denom = n_valid if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=total.device)
    # No label to learn from and nothing to divide by (every label -100, a one-token sequence, Trainer's
    # num_items_in_batch=0 for a masked window): stock's loss is 0 / 0 = nan with zero gradients, since
    # cross_entropy leaves ignored rows at zero whatever the incoming gradient. total / 0 would send inf into the
    # backward here, and 0 * inf = nan into every gradient: one such step would poison the weights. So divide by
    # 1 there and add the nan to the value only. Elsewhere this is total / denom + 0.0, unchanged.
    empty = (n_valid == 0) & (denom == 0)
    return total / torch.where(empty, 1, denom) + torch.where(empty, float("nan"), 0.0)


def head_changed(model, head) -> str | None:
    """None while `head` (the lm_head proven at apply time) is still what the model computes its logits with,
    exactly as F.linear(hidden, head.weight, head.bias): the same module object, of class nn.Linear itself,
    with no forward / backward hooks or forward override, plain tensor parameters, and no loss_function of
    the user's on the model. Else why not. The weight is read at
    each call, so a Parameter replaced in place (FSDP2's unsharded parameter, load_state_dict(assign=True))
    is the one stock would use too; a wrapper (PEFT's LoRA, modules_to_save, trainable tokens replace
    lm_head), a parametrization (changes the class) or a hook is not."""
    current = getattr(model, "lm_head", None)
    if current is not head:
        return (f"lm_head is now {type(current).__name__}, not the nn.Linear proven at apply time (an adapter such "
                "as PEFT's LoRA, modules_to_save or trainable tokens wraps or replaces it)")
    if type(head) is not torch.nn.Linear or "forward" in vars(head):
        return f"lm_head's class or forward changed ({type(head).__name__})"
    mod = torch.nn.modules.module
    if head._forward_hooks or head._forward_pre_hooks or mod._global_forward_hooks or mod._global_forward_pre_hooks:
        return "lm_head has forward hooks"
    if head._backward_hooks or head._backward_pre_hooks or mod._global_backward_hooks or \
            mod._global_backward_pre_hooks:
        return "lm_head has backward hooks (the fused loss computes its gradient without calling it)"
    for name in ("weight", "bias"):
        t = head._parameters.get(name)
        if t is not None and type(t) not in (torch.nn.Parameter, torch.Tensor):
            return f"lm_head.{name} is a {type(t).__name__}"
    if "_loss_function" in vars(model):
        return "a loss_function of its own is set on the model"
    return None


def _keeps_some_logits(kwargs) -> str | None:
    """The fused path computes the loss of every position (logits_to_keep=0, the default); a call asking for fewer
    logits gets the stock forward, whose loss then sees those logits only (a causal LM's raises on the length
    mismatch), as it would unpatched."""
    keep = kwargs.get("logits_to_keep", 0)
    if isinstance(keep, int) and not isinstance(keep, bool) and keep == 0:
        return None
    return f"logits_to_keep={keep if isinstance(keep, int) else type(keep).__name__} given with labels"


class FusedLossForward:
    """Callable set as `model.forward` (an instance attribute).

    In training with labels (and a dict output) it runs the model's own forward with logits_to_keep=1 and
    answers the forward's `self.loss_function(logits, labels, ...)` call with the fused loss of the decoder's
    last hidden state (captured by a hook) and lm_head. Everything else in the forward is the model's own
    code, read at each call: the router aux-loss term (`output_router_logits`, `router_aux_loss_coef`, as
    set now on the model or its config), the outputs. It does so only while
      - lm_head is the module proven at apply time, used as is (head_changed()), and
      - the config and the model's scalar attributes are those proven, or a new proof of them passes
        (probe.fused_loss_unproven, cached per fingerprint: a switch flipped after apply() is proven again);
    otherwise the stock forward runs, with one warning per reason.
    """

    def __init__(self, model, backend: str, step: str = "compiled", head=None):
        self.model, self.backend, self.step = model, backend, step
        self.head = model.lm_head if head is None else head
        self.cls = type(model)  # the class proven (FSDP2's fully_shard later swaps in a subclass of it)
        self.stock_forward = model.forward  # the bound class method
        self.stock_reason = None  # why the last call took the stock path, if it did
        self._warned: set = set()
        # look like the stock forward to callers that inspect it (Trainer's column and loss-kwargs checks)
        functools.update_wrapper(self, self.stock_forward)
        self.__signature__ = inspect.signature(self.stock_forward)

    @classmethod
    def for_proof(cls, model):
        """The fused path of a throw-away instance, without its own checks (probe.fused_loss_unproven)."""
        return cls(model, "torch").fused

    def _why_stock(self, model) -> str | None:
        from .. import probe

        why = head_changed(model, self.head)
        if why is None:
            why = probe.fused_loss_unproven(model, FusedLossForward.for_proof, self.cls)
        return why

    def __call__(self, *args, **kwargs):
        model = self.model
        labels = kwargs.get("labels")
        return_dict = kwargs.get("return_dict")
        return_dict = getattr(model.config, "return_dict", True) if return_dict is None else return_dict
        # tuple outputs are positional (loss, logits, ...): without logits they would shift, so they take
        # the stock path, as evaluation and calls without labels do
        if not model.training or labels is None or not torch.is_grad_enabled() or not return_dict:
            return self.stock_forward(*args, **kwargs)
        if getattr(model, "_moe_patch", None) is None:  # reverted, with a wrapper set over this forward kept
            return self.stock_forward(*args, **kwargs)
        self.stock_reason = _keeps_some_logits(kwargs) or self._why_stock(model)
        if self.stock_reason is not None:
            if self.stock_reason not in self._warned:
                self._warned.add(self.stock_reason)
                warnings.warn(f"moe_patch: the fused loss is not used, the model's own loss runs: {self.stock_reason}",
                              RuntimeWarning, stacklevel=2)
            return self.stock_forward(*args, **kwargs)
        return self.fused(*args, **kwargs)

    def fused(self, *args, **kwargs):
        model, head = self.model, self.model.lm_head
        captured = {}

        def grab(module, inputs, output):
            captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

        def fused_loss(logits=None, labels=None, vocab_size=None, num_items_in_batch=None, ignore_index=IGNORE,
                       shift_labels=None, **_):
            captured["loss"] = True
            return causal_lm_loss(captured["hidden"], head, labels, self.backend, num_items_in_batch, shift_labels,
                                  self.step, ignore_index)

        if "use_cache" in self.__signature__.parameters and not _packing_found_without_cache(args, kwargs):
            # no KV cache unless asked for: a training step never reads it (stock builds and fills one)
            kwargs.setdefault("use_cache", False)
        handle = getattr(model, model.base_model_prefix).register_forward_hook(grab)
        model._loss_function = fused_loss  # what the `loss_function` property returns while set
        try:
            out = self.stock_forward(*args, **{**kwargs, "logits_to_keep": 1})
        finally:
            handle.remove()
            vars(model).pop("_loss_function", None)
        if "loss" not in captured:  # the proof runs the same forward: this cannot happen silently
            raise RuntimeError(f"moe_patch: {type(model).__name__}.forward did not call loss_function; "
                               "apply(model, loss=False) keeps the stock loss")
        out.logits = None
        return out
