"""Model access, and the only place that knows about models: offline resolution (`resolve`),
loading (`loading`), where a model's parts are and its image token id / text config /
attention implementation (`parts`), the prompt format (`prompt`), the generic adapter that
exposes all of them (`adapter`) and the per-architecture facts (`overrides`).

`register_overrides(model_type, cls)` adds an architecture without editing the package
(see `embedlens.models.overrides.base.register_overrides`); it is imported lazily so that
planning code (`resolve`) does not import torch.
"""


def __getattr__(name):
    if name in ("register_overrides", "ArchOverrides", "unknown_layout", "TokenLayout", "ImageContext"):
        from embedlens.models import overrides

        return getattr(overrides, name)
    raise AttributeError(f"module 'embedlens.models' has no attribute {name!r}")
