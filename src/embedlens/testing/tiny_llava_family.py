"""Tiny random models of LLaVA-style families: LLaVA-OneVision, Aya Vision, Mistral 3 (Pixtral vision), InternVL, SmolVLM.

Builders return (config, processor) like the ones in `embedlens.testing.tiny`.
"""

from __future__ import annotations

BUILDERS: dict = {}
SKIPPED: dict[str, str] = {}
