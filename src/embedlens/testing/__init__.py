"""Helpers for tests: tiny random VLMs with offline processors (no model hub)."""

from embedlens.testing.tiny import TINY_ARCHS, TINY_SKIPPED, build_tiny_model

__all__ = ["TINY_ARCHS", "TINY_SKIPPED", "build_tiny_model"]
