"""Text tokenization with the ``tokenizers`` library only.

Serving paths must not need torch or transformers, so the package stores a
single ``tokenizer.json`` (the fast-tokenizer format) and inference loads it
with ``tokenizers.Tokenizer``.  The built-in model trains a WordPiece
vocabulary on the training corpus; the MiniLM option reuses its own.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class Encoded:
    """One text, tokenized.  ``offsets`` are character spans in the original
    text ((0, 0) for special tokens); ``word_start`` marks tokens that begin
    a word (used to emit B- versus I- tags)."""

    ids: np.ndarray
    offsets: list[tuple[int, int]]
    special: np.ndarray


def train_wordpiece(corpus: Iterable[str], vocab_size: int = 2000, lowercase: bool = True) -> Tokenizer:
    """Build a BERT-style WordPiece tokenizer for ``corpus``, deterministically.

    The vocabulary is every character seen (as a word start and as a
    ``##`` continuation, so any text seen in training tokenizes without
    [UNK]) plus the most frequent whole words, ties broken alphabetically.
    ``tokenizers``' own trainer is not used because it breaks frequency ties
    in hash-map order, which changes from process to process: the same
    corpus and seed must always give the same token ids, and so the same
    trained model."""
    tok = Tokenizer(WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, clean_text=True, strip_accents=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in corpus:
        norm = tok.normalizer.normalize_str(text)
        words.update(w for w, _span in tok.pre_tokenizer.pre_tokenize_str(norm))
    chars = sorted({c for w in words for c in w})
    base = [*SPECIAL, *chars, *(f"##{c}" for c in chars)]
    taken = set(base)
    ranked = sorted((w for w in words if w not in taken), key=lambda w: (-words[w], w))
    vocab_list = base + ranked[: max(0, vocab_size - len(base))]
    tok.model = WordPiece(vocab={t: i for i, t in enumerate(vocab_list)}, unk_token="[UNK]")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return tok


def copy_pretrained(src_dir: Path, out_dir: Path) -> None:
    """Take a pretrained model's ``tokenizer.json`` as is."""
    src = Path(src_dir) / TOKENIZER_FILE
    if not src.is_file():
        raise FileNotFoundError(f"{src_dir} has no {TOKENIZER_FILE}; only fast tokenizers are supported")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, out_dir / TOKENIZER_FILE)


class TextEncoder:
    """Wraps a ``tokenizers.Tokenizer`` with the package's max length."""

    def __init__(self, tokenizer: Tokenizer, max_length: int) -> None:
        self.tok = tokenizer
        self.max_length = max_length
        self.tok.no_padding()
        self.tok.enable_truncation(max_length=max_length)
        pad = self.tok.token_to_id("[PAD]")
        if pad is None:
            pad = self.tok.token_to_id("<pad>")
        self.pad_id = int(pad or 0)

    @classmethod
    def load(cls, directory: Path, max_length: int) -> TextEncoder:
        return cls(Tokenizer.from_file(str(Path(directory) / TOKENIZER_FILE)), max_length)

    @property
    def vocab_size(self) -> int:
        return int(self.tok.get_vocab_size())

    def encode(self, text: str) -> Encoded:
        enc = self.tok.encode(text)
        return Encoded(
            ids=np.asarray(enc.ids, dtype=np.int64),
            offsets=[tuple(o) for o in enc.offsets],
            special=np.asarray(enc.special_tokens_mask, dtype=bool),
        )

    def encode_batch(self, texts: list[str]) -> list[Encoded]:
        """Many texts in one call: the tokenizer runs them in parallel in
        Rust, outside the GIL."""
        return [
            Encoded(ids=np.asarray(e.ids, dtype=np.int64), offsets=[tuple(o) for o in e.offsets],
                    special=np.asarray(e.special_tokens_mask, dtype=bool))
            for e in self.tok.encode_batch(texts)
        ]

    def empty(self) -> Encoded:
        """Encoding used when a record has no text (the presence mask hides it)."""
        return self.encode("")

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(directory / TOKENIZER_FILE))
