"""Model access: offline resolution (`resolve`), the generic adapter (`adapter`) and the
per-architecture facts (`overrides`).

`register_overrides(model_type, cls)` adds an architecture without editing the package
(see `embedlens.models.overrides.base.register_overrides`); it is imported lazily so that
planning code (`resolve`) does not import torch.
"""


def __getattr__(name):
    if name in ("register_overrides", "ArchOverrides", "unknown_layout", "TokenLayout", "ImageContext"):
        from embedlens.models import overrides

        return getattr(overrides, name)
    raise AttributeError(f"module 'embedlens.models' has no attribute {name!r}")
