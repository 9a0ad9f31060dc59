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
# read from the replacement while linked: the stores nn.Module's methods use
_VIEWED = frozenset(_STORES) | {"_non_persistent_buffers_set"}
_PRIVATE = "_moe_patch"
# on a detached original while patched: the replacement's own attributes (not the family's), never read through
_OWN = "_moe_patch_own"
_MISSING = object()


def _handed_back(name: str, original_dict: dict) -> bool:
    """Whether the replacement's plain attribute `name` is one of the module's (not moe_patch's own)."""
    if name in _MODULE_STATE or name.startswith(_PRIVATE):
        return False
    return name in original_dict or not name.startswith("_") and name not in original_dict.get(_OWN, ())


class _Detached(nn.Module):
    """The class of an original module while its replacement runs in the model (mixed before the family's class:
    isinstance checks still hold; link() swaps it in, unlink() swaps the family's class back). Reads of the
    module's plain attributes (the names in its own __dict__, and `training`) come from the replacement; a write
    or delete of a plain attribute is made on the original and on the replacement alike, as it would be on a
    stock model, where both are one object. Its parameter, buffer and child stores (`_parameters`, `_buffers`,
    `_modules`, `_non_persistent_buffers_set`) are the replacement's while linked: nn.Module's own methods on the
    original (`to()` / `half()` / `float()`, which replace buffers in the store, `register_buffer`,
    `state_dict()`, `named_parameters()`, `load_state_dict()`, ...) act on what the model runs, and a Parameter
    replaced on the model after apply() (load_state_dict(assign=True)) is the one they see."""

    def __getattribute__(self, name):
        own = object.__getattribute__(self, "__dict__")
        live = own.get(_LIVE)
        if live is not None:
            if name in _VIEWED:
                return live.__dict__[name]
            if name == "training" or name in own and name not in _MODULE_STATE and name != _LIVE:
                values = live.__dict__
                if name in values:
                    return values[name]
        return object.__getattribute__(self, name)

    def __getattr__(self, name):  # not an instance attribute: a Parameter, buffer or child
        live = self.__dict__.get(_LIVE)
        if live is not None:
            values = live.__dict__
            for store in _STORES:
                if name in values[store]:
                    return values[store][name]
            if name in values and _handed_back(name, self.__dict__):  # (not in own __dict__: a new name)
                return values[name]  # a plain attribute set through the model since apply()
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        live = self.__dict__.get(_LIVE)
        if live is None or name.startswith("__"):
            return super().__setattr__(name, value)
        setattr(live, name, value)  # nn.Module's checks run here, on the stores the model uses
        own = self.__dict__
        if name in live.__dict__:  # a plain attribute: the original holds the name too (read through above)
            own[name] = value
        else:  # a Parameter, buffer or child: in the (shared) stores only
            own.pop(name, None)

    def __delattr__(self, name):
        live = self.__dict__.get(_LIVE)
        if live is None or name.startswith("__"):
            return super().__delattr__(name)
        own = self.__dict__
        mine = own.pop(name, _MISSING) is not _MISSING and name not in _MODULE_STATE
        if name in live.__dict__ or any(name in live.__dict__[s] for s in _STORES):
            delattr(live, name)
        elif not mine:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

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

    def __call__(cls, *args, **kwargs):  # type(g)(config): a new module of the family's class, as on stock
        return cls._moe_patch_family(*args, **kwargs)

    return type(f"_Detached{meta.__name__}", (meta,), {"__instancecheck__": __instancecheck__,
                                                       "__subclasscheck__": __subclasscheck__,
                                                       "__call__": __call__})


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
            if name not in _MODULE_STATE and not name.startswith(_PRIVATE):
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
        original.__dict__[_OWN] = frozenset(n for n in vars(self) if n not in vars(original))
        if not isinstance(original, _Detached):
            object.__setattr__(original, "__class__", _detached(type(original)))

    def unlink(self) -> None:
        """The original is a module of its own again: its family's class, no moe_patch attribute."""
        original = self.original
        if isinstance(original, _Detached):
            object.__setattr__(original, "__class__", type(original).__bases__[1])
            original.__dict__.pop(_LIVE, None)
            original.__dict__.pop(_OWN, None)

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
            if name not in _MODULE_STATE and not name.startswith(_PRIVATE):
                self.__dict__[name] = value
        self.train(original.training)
        self.link()

    def give_back(self) -> nn.Module:
        """Hand the (possibly moved, cast or re-wrapped) tensors back to the original module and return it."""
        original = self.original
        linked = dict(vars(original))  # (its names and _OWN, before unlink() drops the link)
        self.unlink()  # writes made through either object while patched are on this one: handed back below
        # the stores as the model has them now: Parameters / buffers / children replaced, added or removed since
        # apply(), through the model or through a reference to the original (whose stores were these while linked)
        for name in _VIEWED:
            store = original.__dict__[name]
            store.clear()
            store.update(self.__dict__[name])
        for name, value in vars(self).items():  # attributes set on the module while patched (through either)
            if _handed_back(name, linked):
                original.__dict__[name] = value
        original.train(self.training)
        return original

    def extra_repr(self) -> str:
        return f"replaces {type(self.original).__name__}"
