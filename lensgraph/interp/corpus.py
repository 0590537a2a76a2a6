"""A text corpus as context windows of token ids, packed as SAELens packs them.

The corpus is read with `datasets` (a text file with one document a line, a JSONL or parquet
file, a folder written by `save_to_disk`, or a hub dataset id), optionally shuffled by a seed,
tokenized with the model's `tokenizers` tokenizer without special tokens, and packed: each
window starts with BOS (where the tokenizer has one and the window does not already start
with it), a document that joins a window already holding another is preceded by EOS, a
document longer than the room left carries on in the next window, and the last, incomplete
window is dropped. The windows are a pure function of the corpus, the tokenizer, the context
and the seed, so a rerun (or another engine) makes the very same windows in the same order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from ..errors import BadInputError, missing_extra

FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
READ_BATCH = 1000  # documents tokenized at a time


def _datasets():
    try:
        import datasets
    except ModuleNotFoundError as exc:
        raise missing_extra(exc.name, "lensgraph collect", extra="collect") from None
    datasets.disable_progress_bars()
    return datasets


def open_corpus(corpus, column: str = "text", seed: int | None = None, split: str = "train"):
    """The documents as a `datasets` Dataset (an IterableDataset for a hub id, which streams)
    with one column, `column`; refused when missing, empty or without that column."""
    datasets = _datasets()
    path = os.path.expanduser(os.fspath(corpus))
    if os.path.isdir(path):
        try:
            ds = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError) as exc:
            raise BadInputError(f"{path}: not a folder written by datasets' save_to_disk ({_line(exc)})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise BadInputError(f"{path}: has no split {split!r} (splits: {', '.join(ds)}); give --split")
            ds = ds[split]
    elif os.path.isfile(path):
        kind = FORMATS.get(os.path.splitext(path)[1].lower())
        if kind is None:
            raise BadInputError(f"{path}: give a .txt (one document a line), .jsonl or .parquet file, or a "
                                "save_to_disk folder")
        if os.path.getsize(path) == 0:
            raise BadInputError(f"{path}: the corpus is empty")
        try:
            ds = datasets.load_dataset(kind, data_files=path, split="train")
        except Exception as exc:  # a malformed file: the library's own words
            raise BadInputError(f"{path}: cannot read it as {kind} ({_line(exc)})") from None
    elif _looks_like_hub_id(path):
        try:
            ds = datasets.load_dataset(path, split=split, streaming=True)
        except Exception as exc:
            raise BadInputError(f"{path}: no such file or folder, and not a dataset the hub can give "
                                f"({_line(exc)})") from None
    else:
        raise BadInputError(f"{path}: no such file or folder")
    names = ds.column_names if ds.column_names is not None else list(next(iter(ds)).keys())
    if column not in names:
        raise BadInputError(f"{path}: has no column {column!r} (columns: {', '.join(names)}); give --column")
    ds = ds.select_columns([column])
    if isinstance(ds, datasets.Dataset):
        if len(ds) == 0:
            raise BadInputError(f"{path}: the corpus is empty")
        return ds.shuffle(seed=seed, keep_in_memory=True) if seed is not None else ds
    return ds.shuffle(seed=seed, buffer_size=10_000) if seed is not None else ds


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) <= 2 and all(parts) and not path.startswith((".", "~")) \
        and os.path.splitext(path)[1].lower() not in FORMATS


def _line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def documents(ds, column: str):
    """The documents' texts in order, READ_BATCH at a time."""
    for batch in ds.iter(batch_size=READ_BATCH):
        yield [t if isinstance(t, str) else "" for t in batch[column]]


@dataclass
class TokenizerSpec:
    """What the workers need to rebuild the tokenizer, and the special tokens packing uses."""

    path: str  # tokenizer.json
    bos: int | None
    eos: int | None
    vocab: int

    def load(self):
        return _load_tokenizers(self.path)

    def to_dict(self) -> dict:
        return {"path": self.path, "bos_token_id": self.bos, "eos_token_id": self.eos, "vocab_size": self.vocab}


def _load_tokenizers(path: str):
    try:
        from tokenizers import Tokenizer
    except ModuleNotFoundError as exc:
        raise missing_extra(exc.name, "lensgraph collect", extra="collect") from None
    try:
        return Tokenizer.from_file(path)
    except Exception as exc:
        raise BadInputError(f"{path}: not a usable tokenizer.json ({_line(exc)})") from None


def tokenizer_spec(where) -> TokenizerSpec:
    """The tokenizer of a model folder (tokenizer.json, with tokenizer_config.json or
    special_tokens_map.json naming BOS and EOS), a tokenizer.json file, or a hub model id."""
    path = os.path.expanduser(os.fspath(where))
    if os.path.isfile(path):
        folder, file = os.path.dirname(path), path
    elif os.path.isdir(path):
        folder, file = path, os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise BadInputError(f"{path}: has no tokenizer.json; give the tokenizer with --tokenizer")
    elif _looks_like_hub_id(path):
        folder = _hub_tokenizer(path)
        file = os.path.join(folder, "tokenizer.json")
    else:
        raise BadInputError(f"{path}: no such tokenizer file or folder")
    tok = _load_tokenizers(file)
    special = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config has the last word
        try:
            with open(os.path.join(folder, name)) as f:
                special.update({k: v for k, v in json.load(f).items() if k in ("bos_token", "eos_token") and v})
        except (OSError, ValueError):
            continue
    ids = {}
    for key in ("bos_token", "eos_token"):
        value = special.get(key)
        content = value.get("content") if isinstance(value, dict) else value
        ids[key] = tok.token_to_id(content) if isinstance(content, str) else None
    return TokenizerSpec(os.path.abspath(file), ids["bos_token"], ids["eos_token"], tok.get_vocab_size(True))


def _hub_tokenizer(repo: str) -> str:
    try:
        from huggingface_hub import hf_hub_download
    except ModuleNotFoundError as exc:
        raise missing_extra(exc.name, "a hub tokenizer", extra="collect") from None
    try:
        file = hf_hub_download(repo, "tokenizer.json")
    except Exception as exc:
        raise BadInputError(f"{repo}: no such tokenizer file or folder, and the hub cannot give one ({_line(exc)})") \
            from None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            hf_hub_download(repo, name)
        except Exception:
            continue
    return os.path.dirname(file)


def encode(tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Each text's token ids, without the special tokens a template would add (packing adds them)."""
    return [np.asarray(e.ids, np.int32) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


class Packer:
    """Documents' token ids in, complete windows out (see the module docstring)."""

    def __init__(self, context: int, bos: int | None, eos: int | None):
        self.context, self.bos, self.eos = context, bos, eos
        self.buf = np.empty(context, np.int32)
        self.pos = 0

    def add(self, doc: np.ndarray) -> list[np.ndarray]:
        out, i, n, ctx = [], 0, len(doc), self.context
        start = True
        while i < n:
            if self.pos == 0:
                if self.bos is not None and doc[i] != self.bos:
                    self.buf[0] = self.bos
                    self.pos = 1
            elif start and self.eos is not None and doc[i] != self.eos:
                self.buf[self.pos] = self.eos
                self.pos += 1
            start = False
            take = min(ctx - self.pos, n - i)
            self.buf[self.pos:self.pos + take] = doc[i:i + take]
            self.pos += take
            i += take
            if self.pos == ctx:
                out.append(self.buf.copy())
                self.pos = 0
        return out


def windows(ds, column: str, spec: TokenizerSpec, context: int):
    """Every window of the corpus in order, as [context] int32 arrays (one machine's version of
    the stream the Ray engine makes in map_batches)."""
    tokenizer, packer = spec.load(), Packer(context, spec.bos, spec.eos)
    for texts in documents(ds, column):
        for doc in encode(tokenizer, texts):
            yield from packer.add(doc)
