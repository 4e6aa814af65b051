"""Tokenization shared by every model: texts or pairs -> token ids -> padded tensors.

It drives the Rust ``tokenizers`` backend directly (one parallel call per chunk, no
Python-side padding objects) and reproduces what ``tokenizer(..., truncation=True,
max_length=n)`` gives: content truncated so that the special tokens still fit. It also
counts truncated inputs, which the HF call hides.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Encoding, Tokenizer, normalizers

from ..errors import InputError, ModelNotFoundError
from ..runtime.batching import flatten

logger = logging.getLogger(__name__)

# the ASCII characters BERT's normalizer deletes (controls other than tab, newline, carriage return)
_BERT_DELETES = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BERT_DELETED_BYTES = bytes(c for c in range(128) if _BERT_DELETES.match(chr(c)))


def _plain_ascii(text: object) -> bool:
    """ASCII text without a character BERT's normalizer deletes. ``bytes.translate`` scans a text five
    times faster than the regular expression, and this runs with the GIL held in the tokenizer thread,
    beside the loop that feeds the device."""
    return (
        isinstance(text, str)
        and text.isascii()
        and len(text.encode("ascii").translate(None, _BERT_DELETED_BYTES)) == len(text)
    )


@dataclass
class Tokenized:
    """Token ids per input (unpadded), segment ids, and how many were cut.

    ``type_ids`` is None when the tokenizer makes no segment ids, and also when every one would be 0
    (single texts through BERT-style tokenizers): :meth:`TextTokenizer.collate` and packing then give
    zeros, so the hot path never turns a column of zeros into Python lists.
    """

    ids: list[list[int]]
    type_ids: list[list[int]] | None
    truncated: int = 0


def load_hf_tokenizer(folder: str | Path, trust_remote_code: bool = False, **kwargs):
    """Load the folder's tokenizer; fall back to the generic fast tokenizer when the
    model-specific class cannot rebuild itself from ``tokenizer.json``."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code, **kwargs)
    except Exception as exc:
        if not (Path(folder) / "tokenizer.json").exists():
            raise ModelNotFoundError(f"could not load a tokenizer from {folder}: {exc}") from exc
        logger.debug("AutoTokenizer failed on %s (%s); loading tokenizer.json directly", folder, exc)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder), **kwargs)
    if _sentence_transformers_lowercases(Path(folder)):
        _lowercase_first(tokenizer.backend_tokenizer)
    return tokenizer


def _sentence_transformers_lowercases(folder: Path) -> bool:
    """``do_lower_case`` in a sentence-transformers folder's ``sentence_bert_config.json``: its
    Transformer module lowercases every text before the tokenizer sees it."""
    try:
        return (
            json.loads((folder / "sentence_bert_config.json").read_text(encoding="utf-8")).get("do_lower_case") is True
        )
    except (OSError, ValueError, AttributeError):
        return False


def _lowercase_first(backend: Tokenizer) -> None:
    """Lowercase before the tokenizer's own normalizer, as sentence-transformers does with
    ``str.lower()``; kept in the tokenizer, so every path (encode, serve, ONNX, training) sees it.
    A BERT normalizer that already lowercases is left alone (setting its ``lowercase`` would also
    strip accents, which sentence-transformers does not)."""
    current = backend.normalizer
    if isinstance(current, normalizers.BertNormalizer) and current.lowercase:
        return
    backend.normalizer = normalizers.Sequence(
        [normalizers.Lowercase(), current] if current else [normalizers.Lowercase()]
    )


class _Pipeline:
    """One Rust tokenizer, with an exact shortcut for plain-ASCII text where its normalizer is BERT's.

    BERT's normalizer (control-character cleanup, CJK spacing, accent stripping, lowercasing) is about
    a third of a WordPiece encode. On ASCII text without control characters all it changes is case
    (and tabs and newlines to spaces, which the pre-tokenizer splits on either way), so such texts go
    through a copy whose normalizer only lowercases: same ids, less host time per text, which is what
    bounds a small encoder's document rate on a GPU. Other texts take the full pipeline. Encodings
    come from ``encode_batch_fast`` (no character offsets: bgekit never reads them).
    """

    def __init__(self, backend: Tokenizer, shortcut: bool = True):
        self.full = backend
        self.ascii = _ascii_shortcut(backend) if shortcut else None

    def __call__(self, texts: list[str], add_special_tokens: bool) -> list[Encoding]:
        try:
            return self._encode(texts, add_special_tokens)
        except TypeError:  # the Rust side's one word for a str it cannot take: a lone surrogate
            _raise_if_not_unicode(texts)
            raise

    def _encode(self, texts: list[str], add_special_tokens: bool) -> list[Encoding]:
        if self.ascii is None:
            return _encode_batch(self.full, texts, add_special_tokens)
        plain = [_plain_ascii(t) for t in texts]
        if all(plain):
            return _encode_batch(self.ascii, texts, add_special_tokens)
        if not any(plain):
            return _encode_batch(self.full, texts, add_special_tokens)
        out: list[Encoding | None] = [None] * len(texts)
        for backend, want in ((self.ascii, True), (self.full, False)):
            rows = [i for i, p in enumerate(plain) if p is want]
            for i, enc in zip(rows, _encode_batch(backend, [texts[i] for i in rows], add_special_tokens), strict=True):
                out[i] = enc
        return out  # type: ignore[return-value]


def _raise_if_not_unicode(texts: list[str]) -> None:
    """An :class:`InputError` naming the first text that is not valid Unicode (holds a lone surrogate,
    as JSON's ``"\\ud800"`` or a bad decode gives), which the tokenizer refuses with a bare TypeError."""
    for index, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(
                f"text {index} is not valid Unicode: a lone surrogate {text[exc.start]!r} at character "
                f"{exc.start}; clean it first (e.g. text.encode('utf-8', 'replace').decode())"
            ) from None


def _ascii_shortcut(backend: Tokenizer) -> Tokenizer | None:
    """A copy of ``backend`` whose normalizer only lowercases (or does nothing, for a cased model),
    when ``backend`` normalizes with BERT's normalizer; None otherwise."""
    normalizer = backend.normalizer
    if not isinstance(normalizer, normalizers.BertNormalizer):
        return None
    shortcut = Tokenizer.from_str(backend.to_str())
    shortcut.normalizer = normalizers.Lowercase() if normalizer.lowercase else None
    return shortcut


def _encode_batch(backend: Tokenizer, texts: list[str], add_special_tokens: bool) -> list[Encoding]:
    """One parallel Rust call; ``encode_batch_fast`` skips character offsets (10-15% less time)."""
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return encode(texts, add_special_tokens=add_special_tokens)


class TextTokenizer:
    """Wraps a Hugging Face fast tokenizer with batch encode, pair encode and collate.

    It stands in for the Hugging Face tokenizer where FlagEmbedding code reaches for
    ``model.tokenizer``: calling it, ``len()``, a single text's ``encode``, and every other attribute
    (``tokenize``, ``convert_ids_to_tokens``, ``model_max_length``, ...) go to :attr:`hf`, the
    tokenizer itself.
    """

    def __init__(self, hf_tokenizer, ascii_shortcut: bool = True):
        """``ascii_shortcut=False`` sends every text through the full normalizer (the shortcut gives the
        same ids; the switch is there to measure it)."""
        backend = getattr(hf_tokenizer, "_tokenizer", None)
        if not isinstance(backend, Tokenizer):
            raise ModelNotFoundError(
                f"{type(hf_tokenizer).__name__} is not a fast tokenizer; bgekit needs a tokenizer.json"
            )
        self.hf = hf_tokenizer
        self.backend = Tokenizer.from_str(backend.to_str())
        self.backend.no_padding()
        self.backend.no_truncation()
        self.ascii_shortcut = ascii_shortcut
        self._untruncated = _Pipeline(self.backend, ascii_shortcut)
        self._truncating_backends: dict[tuple[int, str], _Pipeline] = {}
        self._zero_single_types: dict[bool, bool] = {}  # add_special_tokens -> all segment ids 0
        self.pad_id = hf_tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = hf_tokenizer.eos_token_id if hf_tokenizer.eos_token_id is not None else 0
        self.padding_side = getattr(hf_tokenizer, "padding_side", "right")
        self.truncation_side = getattr(hf_tokenizer, "truncation_side", "right")
        self.uses_type_ids = "token_type_ids" in getattr(hf_tokenizer, "model_input_names", ())
        processor = self.backend.post_processor
        self.n_special_single = processor.num_special_tokens_to_add(False) if processor else 0
        self.n_special_pair = processor.num_special_tokens_to_add(True) if processor else 0

    # -- encoding ---------------------------------------------------------------------------
    def _raw(self, texts: list[str]) -> list[Encoding]:
        return self._untruncated(texts, add_special_tokens=False)

    def _cut(self, enc: Encoding, limit: int) -> bool:
        if len(enc.ids) <= limit:
            return False
        enc.truncate(max(limit, 0), direction=self.truncation_side)
        return True

    def _truncating(self, max_length: int, side: str | None = None) -> _Pipeline:
        """A copy of the backend that truncates to ``max_length`` itself (special tokens counted,
        on ``side``, default :attr:`truncation_side`): one parallel Rust call then does what a per-text
        Python loop of truncate + post-process did (a quarter of a GPU encode's host time). Cached per
        length and side."""
        key = (max_length, side or self.truncation_side)
        backend = self._truncating_backends.get(key)
        if backend is None:
            cutting = Tokenizer.from_str(self.backend.to_str())
            cutting.enable_truncation(max_length, direction=key[1])
            backend = _Pipeline(cutting, self.ascii_shortcut)
            if len(self._truncating_backends) >= 8:  # a few query / passage lengths in practice
                self._truncating_backends.pop(next(iter(self._truncating_backends)))
            self._truncating_backends[key] = backend
        return backend

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "hf":  # not set yet (copy, pickle): no recursion into hf
            raise AttributeError(name)
        return getattr(self.hf, name)

    def pad_right(self) -> TextTokenizer:
        """Pad batches on the right whatever the tokenizer's config says, for a bidirectional encoder
        (BERT / XLM-R embedders, BGE-M3, cross-encoders): left padding put a pad token where CLS pooling
        and a cross-encoder's head read the first row, and shifted BERT's absolute positions, so a text's
        vector depended on the longest text in its batch. Returns ``self``."""
        self.padding_side = "right"
        if getattr(self.hf, "padding_side", "right") != "right":
            self.hf.padding_side = "right"  # model.tokenizer(...) pads as the model does
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The Hugging Face tokenizer's call (``model.tokenizer(texts, ...)``, as in FlagEmbedding)."""
        return self.hf(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.hf)

    def encode(
        self,
        texts: list[str] | str,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        truncation_side: str | None = None,
        **kwargs,
    ):
        """Token ids of each text, truncated to ``max_length`` tokens special tokens included: the end
        of a text is cut (``truncation_side="right"``) or its start (``"left"``); default: the
        tokenizer's :attr:`truncation_side`. The special tokens are added after the cut, so they stay.

        One ``str`` is the Hugging Face tokenizer's ``encode`` (a list of ids, its keyword options); with a
        ``truncation_side``, which that call has no per-call option for, it is cut as a list of one text is
        and its list of ids returned."""
        if truncation_side not in (None, "left", "right"):
            raise InputError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
        if isinstance(texts, str):
            if truncation_side is not None and max_length is not None:
                if kwargs:
                    raise InputError(
                        "TextTokenizer.encode(text, max_length, truncation_side=...) takes no Hugging Face options "
                        f"({', '.join(sorted(kwargs))}); set model.tokenizer.hf.truncation_side for those"
                    )
                return self.encode([texts], max_length, add_special_tokens, truncation_side).ids[0]
            options = kwargs if max_length is None else {"max_length": max_length, **kwargs}
            return self.hf.encode(texts, add_special_tokens=add_special_tokens, **options)
        if max_length is None or kwargs:
            raise InputError(
                "TextTokenizer.encode(texts, max_length) takes a list of texts and a length; "
                "for the Hugging Face tokenizer's options call model.tokenizer(...) or use model.tokenizer.hf"
            )
        special = self.n_special_single if add_special_tokens else 0
        if max_length <= special:
            raise InputError(f"max_length={max_length} leaves no room for text after {special} special tokens")
        encodings = self._truncating(max_length, truncation_side)(texts, add_special_tokens=add_special_tokens)
        ids = [enc.ids for enc in encodings]
        type_ids = None
        if self.uses_type_ids and not self._single_types_are_zero(add_special_tokens):
            type_ids = [enc.type_ids for enc in encodings]
        return Tokenized(ids, type_ids, sum(1 for enc in encodings if enc.overflowing))

    def _single_types_are_zero(self, add_special_tokens: bool) -> bool:
        """Whether every segment id of a single text is 0 (BERT's ``[CLS] a [SEP]``), probed once per
        setting on texts of two lengths: segment ids of one text come from the post-processor's
        template, not from the text."""
        known = self._zero_single_types
        if add_special_tokens not in known:
            probes = self.backend.encode_batch(["hello", "one two three four"], add_special_tokens=add_special_tokens)
            known[add_special_tokens] = all(t == 0 for enc in probes for t in enc.type_ids)
        return known[add_special_tokens]

    def encode_pairs(
        self,
        firsts: list[str],
        seconds: list[str],
        first_max_length: int,
        max_length: int,
        whole_up_to: int | None = None,
    ) -> Tokenized:
        """``[CLS] first [SEP] second [SEP]``-style ids, FlagEmbedding's cross-encoder layout.

        The first text is cut to ``first_max_length`` tokens on its own, the second to
        ``max_length``, then the second is cut again so the pair fits in ``max_length``.

        When the first text (with the special tokens) already fills ``max_length``, cutting the
        second cannot make the pair fit. ``whole_up_to=None`` then cuts the first text so that one
        token of the second remains (the pair always fits ``max_length``); an int is FlagEmbedding
        1.4.2's inference rule, whose ``prepare_for_model(..., truncation="only_second")`` cuts
        nothing in that case: the pair stays whole (each text already cut on its own), longer than
        ``max_length``, as long as it has at most ``whole_up_to`` tokens (the model's positions);
        a longer one is cut as with ``None`` to ``whole_up_to`` tokens.
        """
        if max_length <= self.n_special_pair + 1:
            raise InputError(
                f"max_length={max_length} is too small for a pair with {self.n_special_pair} special tokens"
            )
        template = self._pair_template()
        if template is None:  # a post-processor whose special tokens are not one fixed layout
            return self._encode_pairs_one_by_one(firsts, seconds, first_max_length, max_length, whole_up_to)
        # both sides cut in the Rust batch calls; only the pair's final cut and the join are Python
        first_batch = self._truncating(max(first_max_length, 0))(firsts, add_special_tokens=False)
        second_batch = self._truncating(max_length)(seconds, add_special_tokens=False)
        (prefix, middle, suffix), (prefix_types, type_a, middle_types, type_b, suffix_types) = template
        truncated = 0
        ids, type_ids = [], []
        for first, second in zip(first_batch, second_batch, strict=True):
            a, b = first.ids, second.ids
            keep_a, keep_b = self._pair_lengths(len(a), len(b), max_length, whole_up_to)
            truncated += bool(first.overflowing) or bool(second.overflowing) or keep_a < len(a) or keep_b < len(b)
            a, b = self._keep(a, keep_a), self._keep(b, keep_b)
            ids.append(prefix + a + middle + b + suffix)
            type_ids.append(prefix_types + [type_a] * len(a) + middle_types + [type_b] * len(b) + suffix_types)
        return Tokenized(ids, type_ids if self.uses_type_ids else None, truncated)

    def _pair_lengths(self, len_a: int, len_b: int, max_length: int, whole_up_to: int | None) -> tuple[int, int]:
        """How many tokens of each text a pair keeps (:meth:`encode_pairs`' rule)."""
        specials = self.n_special_pair
        over = len_a + len_b + specials - max_length
        if over <= 0:
            return len_a, len_b
        if len_b > over:  # the second alone absorbs the overflow
            return len_a, len_b - over
        if whole_up_to is not None:
            if len_a + len_b + specials <= whole_up_to:
                return len_a, len_b  # FlagEmbedding: only the second may be cut, so nothing is
            max_length = whole_up_to
        keep_a = max(min(len_a, max_length - specials - 1), 0)
        return keep_a, min(len_b, max_length - specials - keep_a)

    def _keep(self, ids: list[int], count: int) -> list[int]:
        """``ids`` cut to ``count`` tokens on :attr:`truncation_side`."""
        if len(ids) <= count:
            return ids
        return ids[len(ids) - count :] if self.truncation_side == "left" else ids[:count]

    def _pair_template(self) -> tuple | None:
        """The post-processor's pair layout, ``prefix + a + middle + b + suffix`` with the segment ids
        of each part, learned once from two probe pairs and kept only if both give the same layout
        (``[CLS] a [SEP] b [SEP]``, ``<s> a </s></s> b </s>``, ...); None means "process pair by pair"."""
        if "_pair_layout" not in self.__dict__:  # not hasattr: unknown names go on to the HF tokenizer
            layouts = []
            for a_text, b_text in (("hello", "world wide web"), ("one two three", "four")):
                a, b = self.backend.encode_batch([a_text, b_text], add_special_tokens=False)
                joined = self.backend.post_process(a, b, add_special_tokens=True)
                layouts.append(_pair_layout(joined.ids, joined.type_ids, a.ids, b.ids))
            self._pair_layout = layouts[0] if layouts[0] is not None and layouts[0] == layouts[1] else None
        return self._pair_layout

    def _encode_pairs_one_by_one(
        self,
        firsts: list[str],
        seconds: list[str],
        first_max_length: int,
        max_length: int,
        whole_up_to: int | None = None,
    ) -> Tokenized:
        truncated = 0
        ids, type_ids = [], []
        for first, second in zip(self._raw(firsts), self._raw(seconds), strict=True):
            cut = self._cut(first, first_max_length)
            cut |= self._cut(second, max_length)
            keep_a, keep_b = self._pair_lengths(len(first.ids), len(second.ids), max_length, whole_up_to)
            cut |= self._cut(first, keep_a)
            cut |= self._cut(second, keep_b)
            truncated += cut
            enc = self.backend.post_process(first, second, add_special_tokens=True)
            ids.append(enc.ids)
            type_ids.append(enc.type_ids)
        return Tokenized(ids, type_ids if self.uses_type_ids else None, truncated)

    def clip_texts(self, texts: list[str], max_tokens: int, from_start: bool = False) -> tuple[list[str], int]:
        """Each text longer than ``max_tokens`` tokens (no special tokens) cut, as text, to its first
        ``max_tokens`` tokens (``from_start``: its last), at a token boundary of the original string
        (the tokenizer's character offsets): the model then reads the shorter text with its own prompt
        and special tokens. Also how many texts were cut."""
        if max_tokens < 1:
            raise InputError(f"max_tokens must be at least 1, got {max_tokens}")
        try:
            encodings = self.backend.encode_batch(texts, add_special_tokens=False)  # with offsets
        except TypeError:  # a lone surrogate, as in _Pipeline
            _raise_if_not_unicode(texts)
            raise
        out, cut = [], 0
        for text, enc in zip(texts, encodings, strict=True):
            offsets = enc.offsets
            if len(offsets) <= max_tokens:
                out.append(text)
                continue
            cut += 1
            out.append(text[offsets[-max_tokens][0] :] if from_start else text[: offsets[max_tokens - 1][1]])
        return out, cut

    def plain_ids(self, texts: list[str], max_length: int | None = None) -> tuple[list[list[int]], int]:
        """Ids without special tokens, each cut to ``max_length``; also how many were cut."""
        encodings = self._raw(texts)
        truncated = 0
        if max_length is not None:
            truncated = sum(self._cut(enc, max_length) for enc in encodings)
        return [enc.ids for enc in encodings], truncated

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        return self.hf.decode(ids, **kwargs)

    # -- batching ---------------------------------------------------------------------------
    def collate(
        self,
        ids: list[list[int]],
        type_ids: list[list[int]] | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Pad a batch on the tokenizer's side into CPU tensors."""
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        width = int(lengths.max())
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        columns = np.arange(width)
        if self.padding_side == "left":
            real = columns[None, :] >= (width - lengths)[:, None]
        else:
            real = columns[None, :] < lengths[:, None]
        total = int(lengths.sum())
        # a boolean mask fills row by row, left to right: the concatenated ids land in place
        input_ids = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        input_ids[real] = flatten(ids, total)
        mask = real.astype(np.int64)
        types = None
        if type_ids is not None or self.uses_type_ids:  # None from a tokenizer that makes them: all zeros
            types = np.zeros((len(ids), width), dtype=np.int64)
            if type_ids is not None:
                types[real] = flatten(type_ids, total)
        batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
        if types is not None:
            batch["token_type_ids"] = torch.from_numpy(types)
        return batch


def _pair_layout(ids: list[int], types: list[int], a: list[int], b: list[int]) -> tuple | None:
    """Split a processed pair into ``((prefix, middle, suffix), (prefix types, a's type, middle types,
    b's type, suffix types))``, or None when ``a`` and ``b`` do not appear whole and in order."""
    if not a or not b:
        return None
    specials = len(ids) - len(a) - len(b)
    for i in range(specials + 1):
        if ids[i : i + len(a)] != a:
            continue
        for j in range(specials - i + 1):
            start = i + len(a) + j
            if ids[start : start + len(b)] != b or len(set(types[i : i + len(a)])) > 1:
                continue
            if len(set(types[start : start + len(b)])) > 1:
                continue
            end = start + len(b)
            return (
                (ids[:i], ids[i + len(a) : start], ids[end:]),
                (types[:i], types[i], types[i + len(a) : start], types[start], types[end:]),
            )
    return None
