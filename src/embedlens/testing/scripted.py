"""A scripted benchmark backend for tests: planted answers per ``(task, doc_id)``, or an
answer computed from the request, so lmms-eval's official scoring can be checked against
hand-computed numbers."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from embedlens.bench.backend import Answer, GenerationRequest


class ScriptedBackend:
    """Answers with planted texts; records every request it saw (``requests``).

    Args:
        answers: ``(task, doc_id)`` -> answer text.
        answer_fn: fallback for requests without a planted answer: request -> text.
        default: the answer when neither gives one.
    """

    name = "scripted"

    def __init__(self, answers: Mapping[tuple[str, int], str] | None = None,
                 answer_fn: Callable[[GenerationRequest], str] | None = None, default: str = "") -> None:
        self.answers = dict(answers or {})
        self.answer_fn = answer_fn
        self.default = default
        self.requests: list[GenerationRequest] = []

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Answer]:
        out = []
        for req in requests:
            self.requests.append(req)
            key = (req.task, req.doc_id)
            if key in self.answers:
                text = self.answers[key]
            elif self.answer_fn is not None:
                text = self.answer_fn(req)
            else:
                text = self.default
            out.append(Answer(text=text, info={"n_images": len(req.images), "scripted": key in self.answers}))
        return out
