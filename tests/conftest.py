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
