"""SFT data: read local files, validate, normalise, tokenize with loss masks.

Files
-----
``.jsonl`` / ``.ndjson`` (one JSON object per line; blank lines ignored) or ``.json`` (a JSON
array of objects; a ``.json`` file that is really JSON-lines is read as such). A directory
means every ``*.json``/``*.jsonl``/``*.ndjson`` file in it, sorted by name.

Formats (auto-detected per file from its first valid record; every record of the file must
then have that format)
    - ``alpaca``   ``{"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}``
      (user turn = instruction, plus ``"\\n" + input`` when input is non-empty; ``history`` is
      LLaMA-Factory's multi-turn extension)
    - ``sharegpt`` ``{"conversations": [{"from", "value"}], "system"?}`` with ``from`` in
      human/user, gpt/assistant/model, system (``{"role","content"}`` entries are accepted too)
    - ``messages`` (OpenAI) ``{"messages": [{"role", "content"}]}``; roles system/developer,
      user, assistant; content a string or a list of ``{"type": "text", "text"}`` parts.

Everything is normalised to a list of ``{"role", "content"}`` with roles system/user/assistant:
at most one system message, first; non-empty user/assistant contents; at least one assistant
message; messages after the last assistant message are dropped (they train nothing).

Errors
------
A record that cannot be read or normalised raises :class:`DataError` whose message is one line,
``file:line: reason`` (``<records>:N`` for in-memory records, N counted from 1). With
``skip_bad_lines=True`` such records are skipped and counted (``stats["bad_lines"]``; the first
messages are kept in ``stats["errors"]``). A ``.json`` array with broken JSON syntax cannot be
resynchronised and always raises.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from planner.errors import PlanError

from .template import IGNORE_INDEX, TemplateError, encode_conversation, resolve_chat_template

__all__ = [
    "DataError",
    "Conversation",
    "FORMATS",
    "detect_format",
    "normalize_record",
    "load_conversations",
    "build_sft_dataset",
    "split_train_val",
]

FORMATS = ("alpaca", "sharegpt", "messages")
SUFFIXES = (".json", ".jsonl", ".ndjson")
MAX_ERRORS_KEPT = 20
IN_MEMORY = "<records>"

_SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "bot": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}
_MESSAGE_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class DataError(PlanError):
    """A bad record: ``str(err) == f"{file}:{line}: {reason}"`` (one line)."""

    def __init__(self, file, line: int, reason: str):
        self.file = str(file)
        self.line = int(line)
        self.reason = " ".join(str(reason).split())  # one line
        super().__init__(f"{self.file}:{self.line}: {self.reason}")


class _Bad(Exception):
    """Internal: a record-level problem, turned into DataError with file:line by the caller."""


@dataclass
class Conversation:
    messages: list[dict]
    source: str  # "file:line"


# ----------------------------------------------------------------------------- formats

def detect_format(record) -> str | None:
    """``"messages" | "sharegpt" | "alpaca"`` from a record's keys, or None."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    return None


def _text(value, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        parts = []
        for p in value:
            if p.get("type", "text") != "text" or not isinstance(p.get("text"), str):
                raise _Bad(f"{what}: only text content parts are supported, got {p.get('type')!r}")
            parts.append(p["text"])
        return "".join(parts)
    raise _Bad(f"{what} must be a string, got {type(value).__name__}")


def _from_alpaca(rec: dict) -> list[dict]:
    for key in ("instruction", "output"):
        if key not in rec:
            raise _Bad(f"alpaca record missing {key!r}")
    instruction = _text(rec["instruction"], "'instruction'")
    inp = _text(rec.get("input") or "", "'input'")
    output = _text(rec["output"], "'output'")
    msgs = []
    if rec.get("system"):
        msgs.append({"role": "system", "content": _text(rec["system"], "'system'")})
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise _Bad("'history' must be a list of [user, assistant] pairs")
    for k, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise _Bad(f"history[{k}] must be a [user, assistant] pair")
        msgs.append({"role": "user", "content": _text(pair[0], f"history[{k}][0]")})
        msgs.append({"role": "assistant", "content": _text(pair[1], f"history[{k}][1]")})
    user = instruction + ("\n" + inp if inp else "")
    msgs.append({"role": "user", "content": user})
    msgs.append({"role": "assistant", "content": output})
    return msgs


def _from_sharegpt(rec: dict) -> list[dict]:
    if "conversations" not in rec:
        raise _Bad("missing 'conversations' (sharegpt format)")
    conv = rec.get("conversations")
    if not isinstance(conv, list):
        raise _Bad("'conversations' must be a list")
    msgs = []
    if rec.get("system"):
        msgs.append({"role": "system", "content": _text(rec["system"], "'system'")})
    for k, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise _Bad(f"conversations[{k}] must be an object")
        if "from" in turn:
            who, value = turn.get("from"), turn.get("value")
        else:
            who, value = turn.get("role"), turn.get("content")
        role = _SHAREGPT_ROLES.get(str(who).lower()) if who is not None else None
        if role is None:
            raise _Bad(f"conversations[{k}]: unsupported speaker {who!r} "
                       f"(expected one of {sorted(_SHAREGPT_ROLES)})")
        if value is None:
            raise _Bad(f"conversations[{k}]: missing 'value'")
        msgs.append({"role": role, "content": _text(value, f"conversations[{k}].value")})
    return msgs


def _from_messages(rec: dict) -> list[dict]:
    if "messages" not in rec:
        raise _Bad("missing 'messages' (OpenAI messages format)")
    raw = rec.get("messages")
    if not isinstance(raw, list):
        raise _Bad("'messages' must be a list")
    msgs = []
    for k, m in enumerate(raw):
        if not isinstance(m, dict):
            raise _Bad(f"messages[{k}] must be an object")
        role = _MESSAGE_ROLES.get(m.get("role")) if isinstance(m.get("role"), str) else None
        if role is None:
            raise _Bad(f"messages[{k}]: unsupported role {m.get('role')!r} "
                       f"(expected one of {sorted(_MESSAGE_ROLES)})")
        if m.get("content") is None:
            raise _Bad(f"messages[{k}]: missing 'content'")
        msgs.append({"role": role, "content": _text(m["content"], f"messages[{k}].content")})
    return msgs


_NORMALISERS = {"alpaca": _from_alpaca, "sharegpt": _from_sharegpt, "messages": _from_messages}


def _validate(msgs: list[dict]) -> list[dict]:
    if not msgs:
        raise _Bad("empty conversation")
    out = []
    for k, m in enumerate(msgs):
        if m["role"] == "system":
            if k != 0:
                raise _Bad(f"system message at position {k}; only a first system message is allowed")
            if m["content"].strip():
                out.append(m)
            continue
        if not m["content"].strip():
            raise _Bad(f"empty {m['role']} message at position {k}")
        out.append(m)
    last = max((k for k, m in enumerate(out) if m["role"] == "assistant"), default=None)
    if last is None:
        raise _Bad("no assistant message to train on")
    return out[: last + 1]


def normalize_record(record, fmt: str | None = None) -> list[dict]:
    """One raw record -> normalised messages. Raises ``ValueError`` (without file/line)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    try:
        return _normalize(record, fmt)
    except _Bad as e:
        raise ValueError(str(e)) from None


def _normalize(record, fmt: str | None) -> list[dict]:
    if not isinstance(record, dict):
        raise _Bad(f"expected a JSON object, got {type(record).__name__}")
    if fmt is None:
        fmt = detect_format(record)
        if fmt is None:
            raise _Bad("cannot detect format: expected 'messages' (OpenAI), 'conversations' "
                       f"(sharegpt) or 'instruction'/'output' (alpaca) keys, got {sorted(record)[:8]}")
    elif fmt not in _NORMALISERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    return _validate(_NORMALISERS[fmt](record))


# ----------------------------------------------------------------------------- reading

class _Fatal(Exception):
    def __init__(self, line: int, reason: str):
        self.line, self.reason = line, reason


def _iter_jsonl(data: bytes):
    """Yield ``(line_no, obj | _Bad)`` for each non-blank line."""
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, _Bad(f"invalid UTF-8 at byte {e.start}")
            continue
        try:
            yield lineno, json.loads(text)
        except json.JSONDecodeError as e:
            yield lineno, _Bad(f"invalid JSON: {e.msg} (column {e.colno})")


def _iter_json(text: str):
    """Yield ``(line_no, obj)`` for each element of a top-level JSON array; raise _Fatal on bad syntax."""
    dec = json.JSONDecoder()
    n = len(text)
    ws = " \t\r\n"

    line, last = 1, 0

    def line_at(i: int) -> int:
        nonlocal line, last
        line += text.count("\n", last, i)
        last = i
        return line

    def skip(i: int) -> int:
        while i < n and text[i] in ws:
            i += 1
        return i

    def fatal(e: json.JSONDecodeError):
        return _Fatal(e.lineno, f"invalid JSON: {e.msg} (column {e.colno}); a broken .json "
                                "array cannot be skipped, fix the file or use .jsonl")

    i = skip(0)
    if i >= n:
        return
    if text[i] != "[":
        try:
            obj, j = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise fatal(e) from None
        if skip(j) < n:  # several top-level values: JSON lines in a .json file
            raise _NotAnArray
        yield line_at(i), obj
        return
    i = skip(i + 1)
    if i < n and text[i] == "]":
        return
    while True:
        try:
            obj, j = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise fatal(e) from None
        yield line_at(i), obj
        i = skip(j)
        if i < n and text[i] == ",":
            i = skip(i + 1)
            continue
        if i < n and text[i] == "]":
            if skip(i + 1) < n:
                raise _Fatal(line_at(skip(i + 1)), "unexpected data after the closing ']'")
            return
        raise _Fatal(line_at(min(i, n)), "expected ',' or ']' in JSON array")


class _NotAnArray(Exception):
    pass


def _iter_file(path: Path):
    data = path.read_bytes()
    if path.suffix.lower() != ".json":
        yield from _iter_jsonl(data)
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise _Fatal(line, f"invalid UTF-8 at byte {e.start}") from None
    try:
        yield from list(_iter_json(text))
    except _NotAnArray:
        yield from _iter_jsonl(data)


def _resolve_sources(path_or_records):
    """-> list of ("file", Path) or a single ("records", list)."""
    if isinstance(path_or_records, (str, Path)):
        items = [path_or_records]
    elif isinstance(path_or_records, (list, tuple)):
        if path_or_records and all(isinstance(r, dict) for r in path_or_records):
            return [("records", list(path_or_records))]
        if not all(isinstance(r, (str, Path)) for r in path_or_records):
            raise TypeError("expected a path, a list of paths, or a list of record dicts")
        items = list(path_or_records)
        if not items:
            return [("records", [])]
    else:
        raise TypeError(f"expected a path, a list of paths or a list of records, got {type(path_or_records).__name__}")
    out = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES)
            if not files:
                raise FileNotFoundError(f"{p}: no {'/'.join(SUFFIXES)} files in directory")
            out += [("file", f) for f in files]
        elif p.is_file():
            if p.suffix.lower() not in SUFFIXES:
                raise ValueError(f"{p}: unsupported file type {p.suffix!r} (expected {', '.join(SUFFIXES)})")
            out.append(("file", p))
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return out


def _new_stats() -> dict:
    return {"n": 0, "truncated": 0, "dropped": 0, "bad_lines": 0, "tokens": 0,
            "trainable_tokens": 0, "records": 0, "formats": {}, "errors": []}


def _bad(stats: dict, err: DataError, skip: bool) -> None:
    if not skip:
        raise err
    stats["bad_lines"] += 1
    if len(stats["errors"]) < MAX_ERRORS_KEPT:
        stats["errors"].append(str(err))


def load_conversations(path_or_records, fmt: str = "auto", skip_bad_lines: bool = False,
                       stats: dict | None = None) -> tuple[list[Conversation], dict]:
    """Read and normalise records -> ``(conversations, stats)``.

    ``fmt="auto"`` detects the format per file (from its first valid record); otherwise every
    record must have the given format. Stats: ``records`` (non-blank records read),
    ``bad_lines``, ``errors`` (first messages), ``formats`` (file -> format).
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected 'auto' or one of {FORMATS}")
    stats = _new_stats() if stats is None else stats
    convs: list[Conversation] = []
    for kind, src in _resolve_sources(path_or_records):
        if kind == "records":
            name = IN_MEMORY
            items = ((k, rec) for k, rec in enumerate(src, 1))
        else:
            name = str(src)
            items = _iter_file(src)
        file_fmt = None if fmt == "auto" else fmt
        fmt_line = None
        try:
            for line, rec in items:
                stats["records"] += 1
                try:
                    if isinstance(rec, _Bad):
                        raise rec
                    if not isinstance(rec, dict):
                        raise _Bad(f"expected a JSON object, got {type(rec).__name__}")
                    if file_fmt is None:
                        detected = detect_format(rec)
                        if detected is None:
                            raise _Bad("cannot detect format: expected 'messages' (OpenAI), "
                                       "'conversations' (sharegpt) or 'instruction'/'output' "
                                       f"(alpaca) keys, got {sorted(rec)[:8]}")
                        msgs = _normalize(rec, detected)
                        file_fmt, fmt_line = detected, line
                        stats["formats"][name] = detected
                    else:
                        rec_fmt = detect_format(rec)
                        if rec_fmt is not None and rec_fmt != file_fmt:
                            where = f" (detected from line {fmt_line})" if fmt_line else ""
                            raise _Bad(f"record is in {rec_fmt!r} format but this file is "
                                       f"{file_fmt!r}{where}")
                        msgs = _normalize(rec, file_fmt)
                        stats["formats"].setdefault(name, file_fmt)
                except _Bad as e:
                    _bad(stats, DataError(name, line, str(e)), skip_bad_lines)
                    continue
                convs.append(Conversation(msgs, f"{name}:{line}"))
        except _Fatal as e:
            raise DataError(name, e.line, e.reason) from None
    return convs, stats


# ----------------------------------------------------------------------------- tokenizing

def build_sft_dataset(path_or_records, tokenizer, cutoff_len: int, train_on_prompt: bool = False,
                      skip_bad_lines: bool = False, fmt: str = "auto",
                      chat_template: str | None = None) -> tuple[list[dict], dict]:
    """Load, normalise, render with the chat template, mask, truncate.

    Returns ``(examples, stats)``: examples are ``{"input_ids": list[int], "labels": list[int]}``
    with labels -100 everywhere but assistant turns (see :mod:`trainer.template`), at most
    ``cutoff_len`` tokens (right-truncated). Stats:

    - ``n``: examples returned; ``records``: non-blank records read
    - ``bad_lines``: records skipped as invalid (only with ``skip_bad_lines``; also covers
      conversations the chat template refuses), ``errors``: their first messages
    - ``truncated``: examples longer than ``cutoff_len`` (counted whether kept or dropped)
    - ``dropped``: examples with no trainable label left (after truncation)
    - ``tokens`` / ``trainable_tokens``: over returned examples; trainable = label positions
      that enter the (shifted) causal-LM loss, i.e. ``labels[1:] != -100``
    - ``formats``: file -> detected format
    """
    if cutoff_len is None or int(cutoff_len) < 2:
        raise ValueError(f"cutoff_len must be >= 2, got {cutoff_len!r}")
    cutoff_len = int(cutoff_len)
    convs, stats = load_conversations(path_or_records, fmt=fmt, skip_bad_lines=skip_bad_lines)
    template = resolve_chat_template(tokenizer, chat_template)
    stats["cutoff_len"] = cutoff_len
    stats["chat_template"] = "tokenizer" if template is getattr(tokenizer, "chat_template", None) else (
        "given" if chat_template else "fallback")
    examples = []
    for conv in convs:
        try:
            ids, labels = encode_conversation(tokenizer, conv.messages, train_on_prompt, template)
        except TemplateError as e:
            file, _, line = conv.source.rpartition(":")
            _bad(stats, DataError(file, int(line), str(e)), skip_bad_lines)
            continue
        if len(ids) > cutoff_len:
            stats["truncated"] += 1
            ids, labels = ids[:cutoff_len], labels[:cutoff_len]
        trainable = sum(1 for lab in labels[1:] if lab != IGNORE_INDEX)
        if trainable == 0:
            stats["dropped"] += 1
            continue
        stats["tokens"] += len(ids)
        stats["trainable_tokens"] += trainable
        examples.append({"input_ids": ids, "labels": labels})
    stats["n"] = len(examples)
    return examples, stats


def split_train_val(examples: list, val_size, seed: int = 42) -> tuple[list, list]:
    """Deterministic split: ``val_size`` is a count (int >= 1) or a fraction in (0, 1).

    The same (len(examples), val_size, seed) always selects the same indices; both parts keep
    the original order.
    """
    n = len(examples)
    if not val_size:
        return list(examples), []
    if isinstance(val_size, float) and 0 < val_size < 1:
        k = max(1, round(n * val_size)) if n > 1 else 0
    elif float(val_size) == int(val_size) and int(val_size) >= 1:
        k = int(val_size)
    else:
        raise ValueError(f"val_size must be an int >= 1 or a fraction in (0, 1), got {val_size!r}")
    if k >= n:
        raise ValueError(f"val_size={val_size!r} leaves no training examples (n={n})")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:k])
    train = [e for i, e in enumerate(examples) if i not in val_idx]
    val = [e for i, e in enumerate(examples) if i in val_idx]
    return train, val
