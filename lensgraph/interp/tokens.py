"""Text in and out through a model folder's tokenizer, in TransformerLens's conventions: the one step
from what a user types to the token ids (and attention mask) a model runs on.

    to_tokens("smollm2/", "The capital of France is")       # [[1, 504, 3575, ...]]: BOS prepended, as TL does
    prompt("smollm2/", ["a", "b c"])                        # Prompt: ids padded on the right, and the mask
    prompt("smollm2/", "What is 2+2?", chat=True)           # the tokenizer's chat template, as HuggingFace applies it
    end_ids(resolve("smollm2/"))                            # where generation stops

The tokenizer is the folder's tokenizer.json (the `tokenizers` library) with the special tokens and
chat template of tokenizer_config.json (or chat_template.jinja). As in TransformerLens: BOS is
prepended unless the tokenizer does so itself (then `prepend_bos=False` drops it), a missing pad or
BOS token is the EOS token, a list of strings is padded on the right with the pad token, and the mask
zeroes the trailing pads. A chat is rendered as HuggingFace renders it (jinja2, sandboxed) and
tokenized without special tokens added: the template writes its own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from ..errors import BadInputError
from ..store.resolve import ModelFiles, resolve

TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE = "chat_template.jinja"
_LOADED: dict[tuple, "Tokenizer"] = {}


class Tokenizer:
    """A folder's tokenizer: text <-> ids, its special tokens and its chat template."""

    def __init__(self, folder: str):
        path = os.path.join(folder, TOKENIZER)
        from tokenizers import Tokenizer as Backend

        try:
            self._tok = Backend.from_file(path)
        except Exception as exc:
            raise BadInputError(f"{path}: no usable tokenizer ({str(exc).splitlines()[0][:200]})") from None
        self.folder = folder
        config = _json(os.path.join(folder, TOKENIZER_CONFIG)) or {}
        special = {k: _content(config.get(f"{k}_token")) for k in ("bos", "eos", "pad")}
        self.eos_token = special["eos"]
        self.bos_token = special["bos"] or self.eos_token  # TransformerLens's defaults
        self.pad_token = special["pad"] or self.eos_token
        self.eos_id, self.bos_id, self.pad_id = (self.token_id(t) for t in (self.eos_token, self.bos_token,
                                                                             self.pad_token))
        self.special_tokens = {f"{k}_token": v for k, v in special.items() if v is not None}
        self.chat_template = _chat_template(config, folder)
        probe = self.encode("a")  # what the tokenizer adds by itself, read as TransformerLens reads it
        self.prepends_bos = len(probe) > 1 and probe[0] == self.bos_id
        self.appends_eos = len(probe) > 1 and self.eos_id is not None and probe[-1] == self.eos_id

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def tokens(self, text: str, prepend_bos: bool = True) -> list[int]:
        """One text's ids as TransformerLens's to_tokens makes them."""
        if prepend_bos and not self.prepends_bos and self.bos_token is not None \
                and len(self.encode(self.bos_token, add_special_tokens=False)) == 1:
            text = self.bos_token + text  # TL prepends the BOS string, so the tokenizer sees what TL's does
        ids = self.encode(text)
        if self.appends_eos:
            while len(ids) > 1 and ids[-1] == self.eos_id:
                ids = ids[:-1]
        if not prepend_bos and self.prepends_bos:
            ids = ids[1:]
        return ids

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """A conversation through the chat template, tokenized without added special tokens."""
        if not self.chat_template:
            raise BadInputError(f"{self.folder}: its tokenizer has no chat template ({TOKENIZER_CONFIG} or "
                                f"{CHAT_TEMPLATE}); give the prompt without chat")
        return self.encode(_render(self.chat_template, messages, add_generation_prompt, self.special_tokens),
                           add_special_tokens=False)


@dataclass
class Prompt:
    ids: np.ndarray  # int64 [batch, pos]
    attention_mask: np.ndarray | None  # int64 [batch, pos] where some position is padding, else None
    tokenizer: Tokenizer | None  # the folder's, for a text prompt


def tokenizer_for(model, required: bool = True) -> Tokenizer | None:
    """The tokenizer of a model folder (or of the folder holding a model file); None, or a message that
    says how to get one, when it has none."""
    if isinstance(model, Tokenizer):
        return model
    files = resolve(model) if not isinstance(model, ModelFiles) else model
    path = os.path.join(files.folder, TOKENIZER)
    if not os.path.isfile(path):
        if not required:
            return None
        raise BadInputError(f"{files.given}: has no {TOKENIZER} beside the model, so it takes token ids, not text; "
                            "`lensgraph convert CHECKPOINT -o FOLDER` writes the checkpoint's tokenizer into FOLDER")
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size)
    if key not in _LOADED:
        _LOADED[key] = Tokenizer(files.folder)
    return _LOADED[key]


def prompt(model, text_or_ids, prepend_bos: bool | None = None, padding_side: str = "right",
           chat: bool = False) -> Prompt:
    """Token ids (and a mask where a batch is padded) from ids, a string, a list of strings, or with
    `chat` a user message (a string) or a conversation (a list of {"role", "content"} dicts)."""
    if padding_side not in ("right", "left"):
        raise BadInputError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
    texts = _texts(text_or_ids, chat)
    if texts is None:
        if chat or prepend_bos is not None:
            raise BadInputError("chat and prepend_bos apply to text; give the prompt as text, not token ids")
        return Prompt(np.asarray(text_or_ids), None, None)
    tok = tokenizer_for(model)
    if chat:
        rows = [tok.chat(messages) for messages in texts]
    else:
        rows = [tok.tokens(t, True if prepend_bos is None else bool(prepend_bos)) for t in texts]
    if not all(rows):
        raise BadInputError("a prompt has no tokens: give some text")
    width = max(map(len, rows))
    pad = tok.pad_id if tok.pad_id is not None else 0
    ids = np.array([r + [pad] * (width - len(r)) if padding_side == "right" else [pad] * (width - len(r)) + r
                    for r in rows], np.int64)
    mask = _mask(ids, tok, padding_side, bool(prepend_bos is None or prepend_bos) and not chat)
    return Prompt(ids, None if mask.all() else mask, tok)


def to_tokens(model, text, prepend_bos: bool = True, padding_side: str = "right") -> np.ndarray:
    """TransformerLens's to_tokens: [batch, pos] int64 ids of a string or a list of strings."""
    if _texts(text, False) is None:
        raise BadInputError(f"to_tokens takes a string or a list of strings, not {type(text).__name__}")
    return prompt(model, text, prepend_bos, padding_side).ids


def to_str_tokens(tokenizer, ids, prepend_bos: bool = True) -> list:
    """Each token as its own string: a list for [pos] ids or one string, a list of lists for [batch, pos]
    ids or a list of strings (tokenized as to_tokens does).

    `tokenizer` is a model folder (or model file beside its tokenizer), a Tokenizer, or anything with
    `decode` (a HuggingFace tokenizer)."""
    if not hasattr(tokenizer, "decode"):
        if not isinstance(tokenizer, (str, os.PathLike, ModelFiles)):
            raise BadInputError(f"a tokenizer must be a model folder with {TOKENIZER} or have decode(), not "
                                f"{type(tokenizer).__name__}")
        tokenizer = tokenizer_for(tokenizer)
    if isinstance(ids, str) or (isinstance(ids, (list, tuple)) and ids and all(isinstance(t, str) for t in ids)):
        if not isinstance(tokenizer, Tokenizer):
            raise BadInputError("text needs a model folder's tokenizer here; give token ids with this tokenizer")
        arr = prompt(tokenizer, ids, prepend_bos).ids
        rows = [[tokenizer.decode([int(t)]) for t in row] for row in arr]
        return rows[0] if isinstance(ids, str) else rows
    arr = np.asarray(ids)
    if arr.ndim not in (1, 2) or not np.issubdtype(arr.dtype, np.integer):
        raise BadInputError(f"ids must be integers shaped [pos] or [batch, pos], got {arr.dtype} {list(arr.shape)}")
    rows = [[tokenizer.decode([int(t)]) for t in row] for row in np.atleast_2d(arr)]
    return rows[0] if arr.ndim == 1 else rows


def end_ids(model) -> list[int]:
    """The ids generation stops at: the tokenizer's EOS and those of generation_config.json and
    genai_config.json, as HuggingFace's and onnxruntime-genai's generate read them."""
    files = resolve(model) if not isinstance(model, ModelFiles) else model
    found = files.config_end_ids()
    tok = tokenizer_for(files, required=False)
    if tok is not None and tok.eos_id is not None and tok.eos_id not in found:
        found.append(tok.eos_id)
    return found


def _texts(value, chat: bool) -> list | None:
    """The prompt as a list of texts (or conversations, for chat), or None for token ids."""
    if isinstance(value, str):
        return [[{"role": "user", "content": value}]] if chat else [value]
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(v, str) for v in value):
            return [[{"role": "user", "content": v}] for v in value] if chat else list(value)
        if chat and all(isinstance(v, dict) for v in value):
            return [list(value)]
        if chat and all(isinstance(v, (list, tuple)) and all(isinstance(m, dict) for m in v) for v in value):
            return [list(v) for v in value]
    if chat:
        raise BadInputError("a chat is a string (one user message), a list of strings, or a list of "
                            "{'role': ..., 'content': ...} messages")
    return None


def _mask(ids: np.ndarray, tok: Tokenizer, padding_side: str, prepend_bos: bool) -> np.ndarray:
    """TransformerLens's attention mask: 0 at the trailing (right) or leading (left) run of pad tokens."""
    real = ids != tok.pad_id
    if padding_side == "right":
        mask = np.cumsum(real[:, ::-1], axis=1)[:, ::-1] > 0
    else:
        lead = np.cumsum(real, axis=1) == 0
        mask = ~lead
        if prepend_bos and tok.bos_id == tok.pad_id:  # the BOS that is also the pad token stays
            rows = np.nonzero(lead.any(axis=1))[0]
            mask[rows, lead[rows].sum(axis=1) - 1] = True
    return mask.astype(np.int64)


def _content(token) -> str | None:
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) and token else None


def _chat_template(config: dict, folder: str) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if not isinstance(template, str):
        path = os.path.join(folder, CHAT_TEMPLATE)
        template = open(path).read() if os.path.isfile(path) else None
    return template or None


def _render(template: str, messages: list[dict], add_generation_prompt: bool, special: dict) -> str:
    """A chat template rendered as HuggingFace's apply_chat_template renders it: jinja2's sandbox with
    trim_blocks, lstrip_blocks and loop controls, raise_exception, strftime_now and a plain tojson."""
    from datetime import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **special)
    except jinja2.exceptions.TemplateError as exc:
        raise BadInputError(f"the chat template refused the conversation: {exc}") from None


def _json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
