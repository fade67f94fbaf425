"""A local, deterministic ByteLevel-BPE tokenizer with a ChatML chat template.

Nothing usable ships inside a PyPI package and nothing may be downloaded, so tests,
examples and CPU smoke runs use a tokenizer trained here in milliseconds on bundled text
(the synthetic SFT conversations from :mod:`trainer.sample_data` plus a fixed English
paragraph). Same vocabulary every run (the corpus is fixed; the BPE trainer breaks ties
deterministically), and cacheable to a directory with ``save_pretrained``.

Special tokens (ids 0-4, in this order): ``<|pad|>``, ``<|bos|>``, ``<|eos|>``,
``<|im_start|>``, ``<|im_end|>``. ``eos_token`` is ``<|im_end|>`` (the end-of-turn token,
so ``generate`` stops at the end of an assistant turn); ``<|eos|>`` is an extra special
token for plain-text (non-chat) use.

    tok = build_local_tokenizer()                       # vocab 2048, ~0.1 s
    tok = build_local_tokenizer(out_dir="cache/tok")    # built once, then loaded
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

__all__ = [
    "SPECIAL_TOKENS",
    "CHATML_TEMPLATE",
    "bundled_corpus",
    "train_bpe",
    "build_local_tokenizer",
]

TOKENIZER_VERSION = 1
PAD, BOS, EOS, IM_START, IM_END = "<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]

# ChatML. The assistant content and its end-of-turn token sit inside {% generation %} so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` also works (tests use it as an
# independent oracle for trainer.template's incremental-render masking). The newline after
# <|im_end|> is outside the generation block: it is never generated at inference time.
CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_PROSE = """\
Supervised fine-tuning teaches a pretrained language model to follow instructions. Each
example is a conversation between a user and an assistant; the model learns to predict the
assistant's words, while the user's words and the system prompt are only context. A planner
estimates whether a run will fit in the memory of a graphics card: the parameters, the
gradients, the optimizer states, the activations saved for the backward pass, the logits and
the temporary buffers of the cross entropy. Low-rank adapters freeze the base weights and
train two small matrices per layer. Quantized adapters store the frozen weights in four bits.
Sharding splits the optimizer states, the gradients and the parameters across many devices,
and offloading moves them to host memory over the bus. Packing places several short
sequences in one row so that no compute is wasted on padding, and the attention mask keeps
every sequence apart. The quick brown fox jumps over the lazy dog. Pack my box with five
dozen liquor jugs. How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday. January, February, March,
April, May, June, July, August, September, October, November and December. One, two, three,
four, five, six, seven, eight, nine, ten, eleven, twelve, twenty, thirty, hundred, thousand.
Red, green, blue, black, white, brown, purple, pink and grey. North, south, east and west.
The learning rate warms up, then decays along a cosine curve; the loss falls, then flattens.
Please answer the question. Thank you! Sure, here is the answer: yes, no, maybe, true, false.
"""


def bundled_corpus() -> list[str]:
    """The fixed training text: sample conversations (with role names) + a prose paragraph."""
    from .sample_data import CAPITALS, WORDS, generate_conversations

    texts = [_PROSE]
    texts.append(" ".join(f"The capital of {c} is {v}." for c, v in sorted(CAPITALS.items())))
    texts.append(" ".join(WORDS) + " " + " ".join(w[::-1] for w in WORDS) + " "
                 + " ".join(w.upper() for w in WORDS) + " " + " ".join("-".join(w) for w in WORDS))
    texts.append(" ".join(str(i) for i in range(0, 1000)))
    for conv in generate_conversations(n=400, seed=12345):
        texts.append("\n".join(f"{m['role']}\n{m['content']}" for m in conv))
    return texts


def train_bpe(vocab_size: int = 2048, corpus: list[str] | None = None):
    """Train a raw ``tokenizers.Tokenizer`` (ByteLevel BPE, specials at ids 0..4)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + 256} (specials + 256 bytes)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus if corpus is not None else bundled_corpus(), trainer=trainer)
    return tok


def _wrap(raw):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START, EOS],
        model_max_length=1 << 20,
        padding_side="right",
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _fingerprint(vocab_size: int) -> str:
    h = hashlib.sha256()
    h.update(f"v{TOKENIZER_VERSION}:{vocab_size}:{CHATML_TEMPLATE}".encode())
    for t in bundled_corpus():
        h.update(t.encode())
    return h.hexdigest()[:16]


def build_local_tokenizer(vocab_size: int = 2048, out_dir=None):
    """Train (or load from ``out_dir``) the local ByteLevel-BPE tokenizer.

    Returns a ``transformers.PreTrainedTokenizerFast`` with the ChatML template above,
    ``bos/eos/pad`` set, ``len(tok) == vocab_size`` when the corpus allows that many merges
    (it does for the default 2048). With ``out_dir``, a tokenizer saved there by the same
    version/vocab size is loaded (local files only); otherwise one is trained and saved.
    """
    fp = _fingerprint(vocab_size)
    if out_dir is not None:
        out_dir = Path(out_dir)
        meta_path = out_dir / "tuneplan_tokenizer.json"
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                meta = {}
            if meta.get("fingerprint") == fp:
                from transformers import PreTrainedTokenizerFast

                tok = PreTrainedTokenizerFast.from_pretrained(str(out_dir), local_files_only=True)
                if not tok.chat_template:
                    tok.chat_template = CHATML_TEMPLATE
                return tok
    tok = _wrap(train_bpe(vocab_size))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(out_dir))
        (out_dir / "tuneplan_tokenizer.json").write_text(
            json.dumps({"fingerprint": fp, "vocab_size": vocab_size, "version": TOKENIZER_VERSION})
        )
    return tok
