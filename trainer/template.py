"""Chat template rendering and exact loss masking.

Template
--------
The tokenizer's own template (``tokenizer.chat_template``, rendered with
``tokenizer.apply_chat_template(..., tokenize=False)``). Base models without one get
:data:`FALLBACK_CHAT_TEMPLATE`, a plain-text template that needs no new special tokens::

    {bos}[### System:\\n{system}\\n\\n]### User:\\n{user}\\n\\n### Assistant:\\n{assistant}{eos}\\n\\n ...

(``{bos}``/``{eos}`` are the tokenizer's own bos/eos tokens, omitted when it has none; the
generation prompt is ``### Assistant:\\n``.)

Masking: incremental rendering
------------------------------
For every assistant message ``i`` we render, as text,

    P_i = render(messages[:i],   add_generation_prompt=True)   # prompt, up to the assistant header
    F_i = render(messages[:i+1], add_generation_prompt=False)  # ... including the assistant turn

and require ``P_i`` to be a prefix of ``F_i`` and ``F_i`` a prefix of the full rendering
(templates that rewrite earlier turns depending on later ones fail this check and raise
:class:`TemplateError` rather than mask silently wrong). The characters ``F_i[len(P_i):]`` are
the assistant turn: its content *and* its end-of-turn token(s) (``<|im_end|>``, ``<|eot_id|>``,
``</s>``...). Whitespace the template emits *after* a trailing special token (ChatML's ``\\n``
after ``<|im_end|>``) is moved to the prompt side: the model stops at the special token at
inference and never generates it. Text after the last assistant turn is dropped (it trains
nothing), so every encoded conversation ends with its last end-of-turn token.

The full text is thus cut into alternating prompt / assistant segments at exact character
boundaries; each segment is tokenized separately (``add_special_tokens=False``) and the ids
are concatenated. Labels are the ids on assistant segments and -100 elsewhere (every assistant
turn of a multi-turn conversation is trained); ``train_on_prompt=True`` trains everything.
Tokenizing per segment is what inference does (the prompt is encoded, then generated tokens
are appended), so no token ever straddles a prompt/answer boundary; for templates whose
boundaries are special tokens or newlines (ChatML, Llama-3, the fallback) the ids equal those
of tokenizing the whole text at once (tests check this for the local tokenizer).

This works with any template (no ``{% generation %}`` markers needed), which is why it was
chosen over ``return_assistant_tokens_mask``; the local tokenizer's template carries the
markers anyway, and tests use HF's assistant mask as an independent oracle.
"""

from __future__ import annotations

__all__ = [
    "FALLBACK_CHAT_TEMPLATE",
    "TemplateError",
    "resolve_chat_template",
    "render",
    "assistant_spans",
    "encode_conversation",
]

IGNORE_INDEX = -100

FALLBACK_CHAT_TEMPLATE = (
    "{% if bos_token is defined and bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '### System:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Assistant:\n' }}"
    "{% generation %}{{ message['content'] }}"
    "{% if eos_token is defined and eos_token %}{{ eos_token }}{% endif %}{% endgeneration %}"
    "{{ '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


class TemplateError(ValueError):
    """The chat template cannot be rendered for a conversation, or is not incremental."""


def resolve_chat_template(tokenizer, chat_template: str | None = None) -> str:
    """``chat_template`` if given, else the tokenizer's own, else :data:`FALLBACK_CHAT_TEMPLATE`."""
    if chat_template:
        return chat_template
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # named templates: use "default"
        own = own.get("default") or next(iter(own.values()), None)
    return own or FALLBACK_CHAT_TEMPLATE


def render(tokenizer, messages, chat_template: str, add_generation_prompt: bool = False) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as e:  # jinja raise_exception(...) / TemplateError / KeyError ...
        raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
    if not isinstance(text, str):
        raise TemplateError(f"chat template rendered {type(text).__name__}, expected str")
    return text


def _special_strings(tokenizer) -> list[str]:
    toks = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(t, "special", False):
            toks.add(str(t))
    return sorted((t for t in toks if t), key=len, reverse=True)


def assistant_spans(tokenizer, messages, chat_template: str | None = None):
    """``(full_text, [(start, end), ...])``: character spans of every assistant turn."""
    template = resolve_chat_template(tokenizer, chat_template)
    full = render(tokenizer, messages, template)
    specials = _special_strings(tokenizer)
    spans: list[tuple[int, int]] = []
    prev_end = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], template, add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1], template)
        if not (upto.startswith(prompt) and full.startswith(upto)) or len(prompt) < prev_end:
            raise TemplateError(
                f"chat template is not incremental at message {i}: rendering a prefix of the "
                "conversation does not give a prefix of the full rendering, so assistant turns "
                "cannot be located exactly"
            )
        start, end = len(prompt), len(upto)
        seg = full[start:end]
        stripped = seg.rstrip()
        if stripped != seg and any(stripped.endswith(s) for s in specials):
            end = start + len(stripped)
        if end > start:
            spans.append((start, end))
        prev_end = end
    return full, spans


def encode_conversation(tokenizer, messages, train_on_prompt: bool = False,
                        chat_template: str | None = None) -> tuple[list[int], list[int]]:
    """Tokenize one normalised conversation -> ``(input_ids, labels)`` (labels -100 off-assistant)."""
    full, spans = assistant_spans(tokenizer, messages, chat_template)
    input_ids: list[int] = []
    labels: list[int] = []
    pos = 0

    def add(text: str, trainable: bool) -> None:
        if not text:
            return
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if (trainable or train_on_prompt) else [IGNORE_INDEX] * len(ids))

    for s, e in spans:
        add(full[pos:s], False)
        add(full[s:e], True)
        pos = e
    if not spans:
        add(full, False)
    # Whatever the template renders after the last assistant turn (ChatML's trailing "\n",
    # turns after the last answer) is dropped: nothing there is trained, so the sequence
    # ends with the last end-of-turn token.
    return input_ids, labels
