"""Errors raised by moe_patch. Everything derives from PatchError so callers can catch one type."""


class PatchError(RuntimeError):
    """Base class: the model was left exactly as it was when this is raised from apply()."""


class BackendUnavailableError(PatchError):
    """A backend asked for by name cannot run here (package missing, no GPU, wrong dtype)."""


class UnsupportedModelError(PatchError):
    """The model (or its wrapper) cannot be patched; the message says what to do instead."""


class MeshError(PatchError):
    """The DeviceMesh given to apply() cannot shard this model's experts."""
