"""Tokenizers of text sets: UTF-8 bytes, or a byte-level BPE trained with `tokenizers`.

A tokenizer's `.spec` is a JSON-able dict that recreates it (`tokenizer_from_spec`), so a
checkpoint can carry its tokenizer and `raymb sample` needs no data folder.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from raymb.data.manifest import find_manifest
from raymb.errors import ConfigError, DataError
from raymb.files import JSON_LIMIT, InputError, check_input, read_bounded, real

BYTE_VOCAB = 256
BPE_FILE = "tokenizer.json"
TOKENIZER_LIMIT = JSON_LIMIT
"""The largest tokenizer file read: a BPE of 50,000 tokens is about 2 MB."""


class Tokenizer(ABC):
    """Text to token ids and back."""

    vocab_size: int

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @property
    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """A JSON-able dict that tokenizer_from_spec turns back into this tokenizer."""


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte; ids that do not end a valid sequence decode to U+FFFD."""

    vocab_size = BYTE_VOCAB

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    @property
    def spec(self) -> dict[str, Any]:
        return {"kind": "bytes"}


class BpeTokenizer(Tokenizer):
    """A byte-level BPE (GPT-2 style) held by a `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def from_json(cls, text: str) -> BpeTokenizer:
        from tokenizers import Tokenizer as HfTokenizer

        return cls(HfTokenizer.from_str(text))

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids))

    def to_json(self) -> str:
        return self._tokenizer.to_str()

    @property
    def spec(self) -> dict[str, Any]:
        return {"kind": "bpe", "json": self.to_json()}


def train_bpe(texts: Iterable[str], vocab_size: int) -> BpeTokenizer:
    """A byte-level BPE of at most `vocab_size` tokens trained on `texts` (fewer when the
    texts run out of pairs to merge). Every byte is in its alphabet, so any text encodes."""
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    check_vocab_size(vocab_size)
    tokenizer = HfTokenizer(models.BPE())
    # No prefix space: decode(encode(text)) gives the text back exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return BpeTokenizer(tokenizer)


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < BYTE_VOCAB or vocab_size >= 2**31:
        raise ConfigError(
            f"--vocab-size {vocab_size}: a byte-level BPE needs at least {BYTE_VOCAB} tokens "
            "(one per byte, before any merge), and fewer than 2**31 (int32 ids)"
        )


def tokenizer_from_spec(spec: dict[str, Any]) -> Tokenizer:
    """The tokenizer a `.spec` describes."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe" and isinstance(spec.get("json"), str):
        return BpeTokenizer.from_json(spec["json"])
    raise DataError(f"not a tokenizer spec: {str(spec)[:80]} (expected kind bytes or bpe)")


def load_tokenizer(
    folder: str | Path, found: tuple[Path, dict[str, Any]] | None = None
) -> Tokenizer:
    """The tokenizer of a prepared text folder (or of its train/val split), from its manifest
    (`found`: the folder and manifest raymb.load already read for it, not read again)."""
    if found is None:
        found = find_manifest(str(folder))
    if found is None:
        raise DataError(f"{folder}: no raymb-data.json here or one level up (not a prepared set)")
    root, manifest = found
    spec = manifest.get("tokenizer")
    if not isinstance(spec, dict):
        raise DataError(f"{root}: its manifest names no tokenizer (task {manifest.get('task')})")
    path = tokenizer_file(root, manifest)
    if path is not None:
        try:
            text = read_bounded(path, "tokenizer file", TOKENIZER_LIMIT).decode("utf-8")
        except InputError as e:
            raise DataError(str(e)) from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not a readable tokenizer (not UTF-8: {e.reason})") from None
        try:
            return BpeTokenizer.from_json(text)
        except Exception as e:  # the tokenizers library's own parse error
            raise DataError(
                f"{path}: not a readable tokenizer ({' '.join(str(e).split())})"
            ) from None
    return tokenizer_from_spec(spec)


def tokenizer_file(root: Path, manifest: dict[str, Any]) -> Path | None:
    """The BPE file a prepared folder's manifest names, checked and not opened: a name in the
    folder (links followed), a regular file (no FIFO, device or folder) of at most
    TOKENIZER_LIMIT bytes; None when the manifest names no file. A DataError otherwise, so the
    driver refuses it before Ray starts (raymb.driver.preflight)."""
    spec = manifest.get("tokenizer")
    if not isinstance(spec, dict) or spec.get("kind") != "bpe" or "file" not in spec:
        return None
    name = spec["file"]
    path = root / str(name)
    # The manifest may come from anyone: its file stays in its folder, links followed.
    if not isinstance(name, str) or not real(path).is_relative_to(real(root)):
        raise DataError(
            f"{root}: its manifest's tokenizer file {name!r} is not in the folder (links "
            f"followed); expected a file name in it such as {BPE_FILE!r}"
        )
    try:
        size = check_input(path, "tokenizer file").st_size
    except InputError as e:
        raise DataError(str(e)) from None
    if size > TOKENIZER_LIMIT:
        raise DataError(
            f"tokenizer file {path}: is larger than {TOKENIZER_LIMIT >> 20} MiB; is it the "
            "right file?"
        )
    return path
