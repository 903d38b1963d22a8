"""Suite-wide settings.

Tiny test models run faster on one torch thread than on two: the per-op thread
start-up dominates the arithmetic, and a loaded 2-core CI machine makes it worse.
Results do not depend on the thread count beyond float rounding the tests allow for.
"""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """`tiny_model(arch)`: the tiny random `arch` model (seed 0), built once per session and
    shared by every test module that asks for it."""
    from embedlens.testing import build_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    built = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = build_tiny_model(arch, root / arch, seed=0)
        return built[arch]

    return get


@pytest.fixture(scope="module")
def models(tiny_model):
    """`models(arch)`: ``(path, model, processor, adapter)`` of the shared tiny `arch` model,
    loaded once per test module for the intervention tests (a module's hooks and caches
    stay in its own copy)."""
    from embedlens.compress import interventions as iv

    loaded = {}

    def get(arch: str):
        if arch not in loaded:
            path = tiny_model(arch)
            loaded[arch] = (path, *iv.load_model(path))
        return loaded[arch]

    return get
