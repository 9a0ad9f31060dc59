"""The one rule every replacement follows: adopt, never copy.

A replacement registers the original module's Parameter objects, buffers and children under the same
names, so `state_dict()` keys, shapes and dtypes stay Hugging Face's, memory does not grow, and an
optimizer built before apply() still updates the weights the patched model uses. It also shares the
original's forward / backward hook dictionaries, so hooks installed before apply() keep firing (Transformers
installs its output recorders, e.g. for `output_router_logits`, at the first forward). And it carries the
original's public plain attributes under their names (`top_k`, `norm_topk_prob`, `variance_epsilon`,
`routed_scaling_factor`, `limit`, `config`, ...), which the replacement reads at each forward, never a copy
taken at apply time: what a user reads back or sets on the module after apply() is what it computes with.
revert() hands them back to the original.

While the model is patched, the original module (detached from the model, but a user may hold a reference taken
before apply()) is a view of its replacement (`link()`, class `_Detached`): its plain attributes are read from
the replacement, and whatever is set or deleted on it is set or deleted on the replacement too. Without that,
`g = model.model.layers[0].mlp.gate; apply(model); g.top_k = 3` changed only the detached object and the model
kept routing top-2 (logits 1.4e-2 off stock, silently). One-way flow: the replacement holds the values.
"""
from __future__ import annotations

from functools import lru_cache

from torch import nn


# the same dict objects, not copies: a hook's RemovableHandle still removes it, and hooks added while
# patched are still there after revert()
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def restore_global(module, name: str, ours, original) -> None:
    """Put `original` back as `module.<name>` where moe_patch had set `ours` (a family module's function routed
    while patched models use it: sink attention, mask builders, the Mamba2 scan), but only if `ours` is still
    there: a function the user (or another library) set since is what the model calls, and stays."""
    if getattr(module, name, None) is ours:
        setattr(module, name, original)


class RouteHandle:
    """The removable handle of one module's use of a family function routed through moe_patch's dispatcher while
    patched models use it (sink attention, the Mamba2 scan). Subclasses say where the uses are counted
    (`_users()`: a dict key -> count, `self.key`) and take the mark off / put the function back in remove(),
    skipping the count where `self.counted` is False.

    A deep copy or an unpickled copy of a patched model (copy.deepcopy, torch.save / load) copies its handles with
    its marked modules: while the family function is routed in this process the copy is one more user of it, so
    reverting either model leaves the other's routing in place; elsewhere the copy's handle counts for nothing."""

    counted = True

    def _users(self) -> dict:
        raise NotImplementedError

    def __setstate__(self, state):
        self.__dict__.update(state)
        users = self._users()
        self.counted = self.module is not None and self.key in users
        if self.counted:
            users[self.key] += 1


def current_params_into(inner: nn.Module, owner: nn.Module) -> None:
    """Point `inner`, a module kept outside the module tree (a TE module), at `owner`'s *current* Parameter
    objects. FSDP2 (sharded at rest, unsharded for each forward), load_state_dict(assign=True) and friends
    replace the Parameter objects on the owner; without this the inner module would keep computing with, and
    sending gradients to, the old ones, which then never train. Called at every forward (a dict lookup)."""
    for name, param in owner._parameters.items():
        if param is not None and inner._parameters.get(name) is not param:  # (no bias: nothing to point at)
            inner._parameters[name] = param


# nn.Module's own bookkeeping (parameters, buffers, children, hooks, training): adopted above by name, never
# copied as plain attributes
_MODULE_STATE = frozenset(vars(nn.Module())) | {"training"}


@lru_cache(maxsize=None)
def _combined(impl: type, original_cls: type) -> type:
    """impl first in the MRO (its forward runs), the original class second, so that isinstance checks in
    Transformers (output recorders for router logits, weight init, ...) still see the family's class."""
    name = f"{impl.__name__}[{original_cls.__name__}]"
    return type(name, (impl, original_cls), {"__module__": impl.__module__, "__qualname__": name})


def _unpickled(impl: type, original_cls: type):
    """An empty instance of the combined class (pickle then restores its state)."""
    cls = _combined(impl, original_cls)
    return cls.__new__(cls)


# on a detached original while patched: its replacement (the live module)
_LIVE = "_moe_patch_live"
_STORES = ("_parameters", "_buffers", "_modules")


class _Detached(nn.Module):
    """The class of an original module while its replacement runs in the model (mixed before the family's class:
    isinstance checks still hold; link() swaps it in, unlink() swaps the family's class back). Reads of the
    module's plain attributes (the names in its own __dict__, and `training`) come from the replacement; a write
    or delete (plain attribute, Parameter, buffer or child) is made on the original and on the replacement alike,
    as it would be on a stock model, where both are one object. Parameters, buffers and children read by name
    come from the replacement (one replaced on the model after apply(), e.g. load_state_dict(assign=True), is
    what the model uses)."""

    def __getattribute__(self, name):
        own = object.__getattribute__(self, "__dict__")
        live = own.get(_LIVE)
        if live is not None and (name == "training" or name in own and name not in _MODULE_STATE and name != _LIVE):
            values = live.__dict__
            if name in values:
                return values[name]
        return object.__getattribute__(self, name)

    def __getattr__(self, name):  # not an instance attribute: a Parameter, buffer or child
        own = self.__dict__
        live = own.get(_LIVE)
        if live is not None:
            for store in _STORES:
                if name in own[store] and name in live.__dict__[store]:
                    return live.__dict__[store][name]
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)  # the original keeps it too (nn.Module's checks run here first)
        live = self.__dict__.get(_LIVE)
        if live is not None and not name.startswith("__"):
            setattr(live, name, value)

    def __delattr__(self, name):
        super().__delattr__(name)
        live = self.__dict__.get(_LIVE)
        if live is not None and not name.startswith("__") and (
                name in live.__dict__ or any(name in live.__dict__[s] for s in _STORES)):
            delattr(live, name)

    def __reduce_ex__(self, protocol):
        # the class is made at apply() time: pickle (torch.save / copy.deepcopy of a patched model) names the family's
        return _unpickled_detached, (type(self).__bases__[1],), self.__getstate__()


@lru_cache(maxsize=None)
def _detached_meta(meta: type) -> type:
    """A metaclass (derived from the family class's own) whose instance and subclass checks are the family class's:
    code holding `type(g)` of a reference taken before apply() (isinstance(model_module, type(g))) branches as it
    did, the replacement in the model being an instance of the family class, not of the detached one."""
    def __instancecheck__(cls, obj):
        return isinstance(obj, cls._moe_patch_family)

    def __subclasscheck__(cls, sub):
        return issubclass(sub, cls._moe_patch_family)

    return type(f"_Detached{meta.__name__}", (meta,), {"__instancecheck__": __instancecheck__,
                                                       "__subclasscheck__": __subclasscheck__})


@lru_cache(maxsize=None)
def _detached(original_cls: type) -> type:
    # the family's class name: repr() and type(m).__name__ read as before
    return _detached_meta(type(original_cls))(
        original_cls.__name__, (_Detached, original_cls),
        {"__module__": original_cls.__module__, "__qualname__": original_cls.__qualname__,
         "_moe_patch_family": original_cls})


def _unpickled_detached(original_cls: type):
    cls = _detached(original_cls)
    return cls.__new__(cls)


class Replacement(nn.Module):
    kind: str = ""

    def __reduce_ex__(self, protocol):
        # the combined class is made at apply() time, so pickle (torch.save(model)) names its two parts
        impl, original_cls = type(self).__bases__
        return _unpickled, (impl, original_cls), self.__getstate__()

    @classmethod
    def build(cls, original: nn.Module, *args, **kwargs):
        """Construct the replacement for `original` (an instance of the original's class too)."""
        family = type(original).__bases__[1] if isinstance(original, _Detached) else type(original)
        return _combined(cls, family)(original, *args, **kwargs)

    def __init__(self, original: nn.Module):
        nn.Module.__init__(self)  # not super(): the original class's __init__ must not run
        for name, param in original._parameters.items():
            self.register_parameter(name, param)
        for name, buf in original._buffers.items():
            self.register_buffer(name, buf, persistent=name not in original._non_persistent_buffers_set)
        for name, child in original._modules.items():
            self.add_module(name, child)
        self.training = original.training
        for name, value in vars(original).items():
            if name not in _MODULE_STATE and name != _LIVE:
                self.__dict__[name] = value
        for name in _HOOK_DICTS:
            setattr(self, name, getattr(original, name))
        # Kept outside the module tree (object.__setattr__) so it adds no state_dict keys; revert() needs it.
        object.__setattr__(self, "_moe_patch_original", original)

    @property
    def original(self) -> nn.Module:
        return self._moe_patch_original

    def link(self) -> None:
        """Make the original (detached from the model by the swap) a view of this replacement (class _Detached)."""
        original = self.original
        original.__dict__[_LIVE] = self
        if not isinstance(original, _Detached):
            object.__setattr__(original, "__class__", _detached(type(original)))

    def unlink(self) -> None:
        """The original is a module of its own again: its family's class, no moe_patch attribute."""
        original = self.original
        if isinstance(original, _Detached):
            object.__setattr__(original, "__class__", type(original).__bases__[1])
            original.__dict__.pop(_LIVE, None)

    def take_back(self) -> None:
        """The inverse of give_back() (swap.replan: patched again after an implementation switch): adopt the
        original's current tensors, children, plain attributes (set on it while it ran in the model) and mode."""
        original = self.original
        for name, param in original._parameters.items():
            self._parameters[name] = param
        for name, buf in original._buffers.items():
            self._buffers[name] = buf
        for name, child in original._modules.items():
            self._modules[name] = child
        for name, value in vars(original).items():
            if name not in _MODULE_STATE and name != _LIVE:
                self.__dict__[name] = value
        self.train(original.training)
        self.link()

    def give_back(self) -> nn.Module:
        """Hand the (possibly moved, cast or re-wrapped) tensors back to the original module and return it."""
        self.unlink()  # writes made through either object while patched are on this one: handed back below
        original = self.original
        for name in list(original._parameters):
            original._parameters[name] = self._parameters[name]
        for name in list(original._buffers):
            original._buffers[name] = self._buffers[name]
        for name in list(original._modules):
            original._modules[name] = self._modules[name]
        for name in list(vars(original)):  # attributes set on the module while patched
            if name not in _MODULE_STATE and name in self.__dict__:
                original.__dict__[name] = self.__dict__[name]
        original.train(self.training)
        return original

    def extra_repr(self) -> str:
        return f"replaces {type(self.original).__name__}"
