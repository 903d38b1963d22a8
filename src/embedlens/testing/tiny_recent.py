"""Tiny random models of Recent families: Qwen3-VL, GLM-4V, Gemma 3n, Llama 4.

Builders return (config, processor) like the ones in `embedlens.testing.tiny`.
"""

from __future__ import annotations

BUILDERS: dict = {}
SKIPPED: dict[str, str] = {}
