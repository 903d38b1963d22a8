"""The prompt format: how one image and a text become the model's input text.

One rule everywhere (extraction, VQA scoring, the compression benchmark, projector
training): the processor's chat template rendered for one user turn holding the image and
the text, with the generation prompt; without a chat template, the architecture's
placeholder (``ArchOverrides.placeholder``, e.g. PaliGemma's ``"{image}{prompt}"``) with the
processor's image token.

Source: transformers' ``ProcessorMixin.apply_chat_template`` (message format
``{"role": ..., "content": [{"type": "image"}, {"type": "text", "text": ...}]}``).
"""

from __future__ import annotations

DEFAULT_PLACEHOLDER = "{image}\n{prompt}"


def user_turn(prompt: str) -> dict:
    """The chat message of one user turn holding one image, then `prompt`."""
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}


def has_chat_template(processor) -> bool:
    """Whether the processor carries a (non-empty) chat template."""
    return bool(getattr(processor, "chat_template", None))


def chat_prompt(processor, prompt: str) -> str:
    """The processor's chat template for one user turn (image + `prompt`) plus the
    generation prompt, untokenized.

    Raises:
        ValueError: the processor has no chat template (the message names its class).
    """
    if not has_chat_template(processor):
        raise ValueError(f"{type(processor).__name__} has no chat template; give it one "
                         "(processor.chat_template) or use format_prompt with a placeholder")
    return processor.apply_chat_template([user_turn(prompt)], add_generation_prompt=True, tokenize=False)


def format_prompt(processor, prompt: str, placeholder: str = DEFAULT_PLACEHOLDER) -> str:
    """The text for one image + `prompt`: `chat_prompt` when the processor has a chat
    template, else `placeholder` with ``{image}`` = the processor's ``image_token`` (or
    ``"<image>"``) and ``{prompt}`` = `prompt`."""
    if has_chat_template(processor):
        return chat_prompt(processor, prompt)
    image = getattr(processor, "image_token", None) or "<image>"
    return placeholder.format(image=image, prompt=prompt)


def assistant_suffix(processor, prompt: str, answer: str) -> str:
    """The text the chat template puts after the generation prompt for an assistant turn
    holding `answer` (the answer, then the template's end-of-turn text).

    Raises:
        ValueError: no chat template, or the conversation with the answer does not start
            with the generation prompt (the template rewrites earlier turns).
    """
    start = chat_prompt(processor, prompt)
    full = processor.apply_chat_template(
        [user_turn(prompt), {"role": "assistant", "content": [{"type": "text", "text": answer}]}], tokenize=False)
    if not full.startswith(start):
        raise ValueError("chat template: the conversation with an answer does not extend the prompt")
    return full[len(start):]
