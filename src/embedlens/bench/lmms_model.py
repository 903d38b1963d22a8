"""``EmbedLensLMM``: the project's lmms-eval model class.

lmms-eval owns the tasks (prompts, data, official metrics); this class only answers their
``generate_until`` requests through a :class:`~embedlens.bench.backend.Backend`, so any
model the adapter loads, under any of the project's interventions, is scored by the
official task code. Registered as ``embedlens`` in the ``lmms_eval.models`` entry-point
group (``lmms-eval eval --model embedlens --model_args model=...,condition=...``).

It is a *simple* model (``is_simple = True``): lmms-eval hands it ``Instance`` objects
whose ``args`` are ``(context, generation_kwargs, doc_to_visual, doc_id, task, split)``
and a ``task_dict`` (task -> split -> documents) to look the document up in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lmms_eval.api.model import lmms

from embedlens.bench.backend import Answer, Backend, GenerationRequest

#: Tokens generated when neither the task nor the project's config sets a length (the
#: TextVQA and RefCOCO task files set none; lmms-eval's own models then use 1024).
DEFAULT_MAX_NEW_TOKENS = 32


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval 0.7.3 loads each entry point of the
    group and expects a ``ModelManifest`` (or a callable returning one); a class there
    would be *called* (instantiated) and rejected."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="embedlens", simple_class_path=f"{__name__}.EmbedLensLMM")


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """``text`` up to (excluding) the earliest occurrence of any non-empty stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


class EmbedLensLMM(lmms):
    """lmms-eval model that answers generation requests through a backend.

    Args:
        backend: answers the requests; ``None`` builds the intervention backend from
            ``model_args`` (``embedlens.bench.intervention_backend.from_model_args``, the
            CLI route: ``--model_args`` arrive here as keywords).
        batch_size: requests per backend call.
        max_new_tokens: task name -> generation length that overrides the task's own
            (the paper used 1 token for MME and MMStar; lmms-eval 0.7.3's MME asks 16).
        default_max_new_tokens: length when neither the override nor the task sets one.
        **model_args: passed to ``from_model_args`` when ``backend`` is None.

    Attributes:
        answer_info: ``(task, doc_id)`` -> the backend's ``Answer.info`` for the last
            answer to that document, plus ``raw_text`` (before the stop-string cut),
            ``max_new_tokens`` and ``backend``.

    Raises:
        TypeError: ``model_args`` given together with a ``backend``.
        ValueError: ``batch_size`` below 1.
    """

    is_simple = True

    def __init__(self, backend: Backend | None = None, *, batch_size: int = 8,
                 max_new_tokens: Mapping[str, int] | None = None,
                 default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, **model_args: Any) -> None:
        super().__init__()
        # lmms-eval's CLI adds these harness knobs to every model's arguments.
        model_args.pop("max_batch_size", None)
        if backend is None:
            # Lazy: the intervention backend loads torch models; the scripted tests never need it.
            from embedlens.bench import intervention_backend

            backend = intervention_backend.from_model_args(**model_args)
        elif model_args:
            raise TypeError(f"EmbedLensLMM: model arguments {sorted(model_args)} are only used to build "
                            "a backend; pass either backend= or model arguments, not both")
        if int(batch_size) < 1:
            raise ValueError(f"EmbedLensLMM: batch_size must be >= 1, got {batch_size!r}")
        self.backend = backend
        self.batch_size = int(batch_size)
        self.max_new_tokens: dict[str, int] = dict(max_new_tokens or {})
        self.default_max_new_tokens = int(default_max_new_tokens)
        self.answer_info: dict[tuple[str, int], dict[str, Any]] = {}

    # -- requests -------------------------------------------------------------------------

    def _request(self, instance) -> GenerationRequest:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = instance.args
        gen_kwargs = dict(gen_kwargs or {})
        doc = self.task_dict[task][split][doc_id]
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        images = [v for v in (visuals or []) if v is not None]
        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        length = self.max_new_tokens.get(task) or gen_kwargs.get("max_new_tokens") or self.default_max_new_tokens
        return GenerationRequest(task=task, doc_id=int(doc_id), text=context, images=images,
                                 max_new_tokens=int(length), until=list(until))

    def generate_until(self, requests) -> list[str]:
        """Greedy answers to lmms-eval ``generate_until`` instances, in order.

        Documents are looked up (and their images decoded) one batch at a time, so memory
        holds ``batch_size`` documents' images, not a whole task's.

        Raises:
            RuntimeError: the backend returned a different number of answers than requests.
        """
        out: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            batch = [self._request(inst) for inst in requests[start:start + self.batch_size]]
            answers: list[Answer] = list(self.backend.generate(batch))
            if len(answers) != len(batch):
                raise RuntimeError(f"backend {getattr(self.backend, 'name', self.backend)!r} returned "
                                   f"{len(answers)} answers for {len(batch)} requests")
            for req, ans in zip(batch, answers):
                text = cut_at_stops(ans.text, req.until)
                self.answer_info[(req.task, req.doc_id)] = {
                    **ans.info, "raw_text": ans.text, "max_new_tokens": req.max_new_tokens,
                    "backend": getattr(self.backend, "name", type(self.backend).__name__)}
                out.append(text)
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "EmbedLensLMM answers by greedy generation only (the paper ran every benchmark as a "
            "generate_until task): use a task's generate_until variant (e.g. mmstar), not a "
            "multiple_choice/log-likelihood one")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(
            "EmbedLensLMM answers single-turn questions only: multi-round tasks need the "
            "conversation state between rounds, which the intervention backend does not keep")

    def clean(self) -> None:
        # lmms-eval's evaluate() calls clean() after generating, and the base class deletes
        # every nn.Module attribute: the same instance is evaluated again under the next
        # task and condition, so nothing is freed here.
        return None
