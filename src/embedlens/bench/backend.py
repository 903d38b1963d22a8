"""What the lmms-eval model class asks a backend for, and what it gets back.

The model class (:mod:`embedlens.bench.lmms_model`) turns lmms-eval's requests into
:class:`GenerationRequest` objects and hands them to a :class:`Backend` in batches; the
backend decides how the answer is produced (the real one runs the adapter's model under
an intervention, ``embedlens.bench.intervention_backend``; the scripted one in
``embedlens.testing`` returns planted answers). Dataclasses and the protocol only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable


@dataclass
class GenerationRequest:
    """One greedy generation request of an lmms-eval task document.

    Attributes:
        task: the lmms-eval task name (e.g. ``"pope"``).
        doc_id: the document's index in the task's evaluation split.
        text: the prompt text the task built (``doc_to_text``, with its pre/post prompt).
        images: the PIL images ``doc_to_visual`` returned for the document (RGB).
        max_new_tokens: the most tokens to generate (the task's own value, or the
            project's per-task override).
        until: stop strings; the model class also cuts the answer at the first one.
    """

    task: str
    doc_id: int
    text: str
    images: list
    max_new_tokens: int
    until: list[str] = field(default_factory=list)


@dataclass
class Answer:
    """A backend's answer to one request.

    Attributes:
        text: the generated text (before the ``until`` cut, which the model class applies).
        info: backend-specific facts about this request (visual tokens kept, seconds,
            tokens generated, ...); kept per ``(task, doc_id)`` by the model class.
    """

    text: str
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """Answers generation requests; ``name`` labels it in logs and results."""

    name: str

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Answer]:
        """One :class:`Answer` per request, in order."""
        ...
