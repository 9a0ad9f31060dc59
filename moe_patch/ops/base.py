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


class Replacement(nn.Module):
    kind: str = ""

    def __reduce_ex__(self, protocol):
        # the combined class is made at apply() time, so pickle (torch.save(model)) names its two parts
        impl, original_cls = type(self).__bases__
        return _unpickled, (impl, original_cls), self.__getstate__()

    @classmethod
    def build(cls, original: nn.Module, *args, **kwargs):
        """Construct the replacement for `original` (an instance of the original's class too)."""
        return _combined(cls, type(original))(original, *args, **kwargs)

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
            if name not in _MODULE_STATE:
                self.__dict__[name] = value
        for name in _HOOK_DICTS:
            setattr(self, name, getattr(original, name))
        # Kept outside the module tree (object.__setattr__) so it adds no state_dict keys; revert() needs it.
        object.__setattr__(self, "_moe_patch_original", original)

    @property
    def original(self) -> nn.Module:
        return self._moe_patch_original

    def give_back(self) -> nn.Module:
        """Hand the (possibly moved, cast or re-wrapped) tensors back to the original module and return it."""
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
