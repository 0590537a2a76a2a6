"""Tokens as text, where a tokenizer is at hand (a model folder's tokenizer.json, or a HuggingFace
tokenizer): TransformerLens's to_str_tokens, which there is a model method."""

from __future__ import annotations

import os

import numpy as np

from ..errors import BadInputError


class Tokenizer:
    """A model folder's tokenizer.json through the `tokenizers` library, else onnxruntime-genai's."""

    def __init__(self, folder: str):
        path = os.path.join(folder, "tokenizer.json")
        try:
            from tokenizers import Tokenizer

            self._hf = Tokenizer.from_file(path)
            self._og = None
            return
        except ImportError:
            self._hf = None
        except Exception as exc:
            raise BadInputError(f"{path}: no usable tokenizer ({str(exc).splitlines()[0][:200]})") from None
        try:
            import onnxruntime_genai as og

            self._og = og.Tokenizer(og.Model(folder))
        except ImportError:
            raise BadInputError("--prompt needs the tokenizers library or onnxruntime-genai") from None

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text).ids if self._hf is not None else list(self._og.encode(text))

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return self._hf.decode(ids) if self._hf is not None else self._og.decode(ids)


def to_str_tokens(tokenizer, ids) -> list:
    """Each token id as its own string: a list for [pos] ids, a list of lists for [batch, pos].

    `tokenizer` is a folder holding tokenizer.json, a Tokenizer, or anything with `decode`
    (a HuggingFace tokenizer)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = Tokenizer(os.fspath(tokenizer))
    if not hasattr(tokenizer, "decode"):
        raise BadInputError(f"a tokenizer must be a folder with tokenizer.json or have decode(), not "
                            f"{type(tokenizer).__name__}")
    arr = np.asarray(ids)
    if arr.ndim not in (1, 2) or not np.issubdtype(arr.dtype, np.integer):
        raise BadInputError(f"ids must be integers shaped [pos] or [batch, pos], got {arr.dtype} {list(arr.shape)}")
    rows = [[tokenizer.decode([int(t)]) for t in row] for row in np.atleast_2d(arr)]
    return rows[0] if arr.ndim == 1 else rows
