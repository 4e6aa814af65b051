"""Checks on what callers pass in, so bad input fails early with a plain message."""

from __future__ import annotations

from collections.abc import ItemsView, KeysView, Mapping, Sequence, Set

from ..errors import InputError


def _refuse_unordered(value: object, what: str, hint: str) -> None:
    """Containers whose iteration is not the rows a caller means: a DataFrame iterates its column
    names, a dict its keys, a set in no fixed order, a 0-d array not at all."""
    if hasattr(value, "columns") and hasattr(value, "iloc"):
        raise InputError(f"{what} is a DataFrame, which iterates over its column names; pass {hint}")
    if isinstance(value, Mapping):
        raise InputError(f"{what} is a {type(value).__name__}, which iterates over its keys; pass {hint}")
    if isinstance(value, Set) and not isinstance(value, (KeysView, ItemsView)):  # a dict's views keep order
        raise InputError(f"{what} is a {type(value).__name__}, which has no order; pass a list")
    if getattr(value, "ndim", None) == 0:
        raise InputError(f"{what} is a 0-d array; pass a string or a list of strings")


def as_text_list(texts: object, what: str = "texts") -> tuple[list[str], bool]:
    """Return ``(list_of_strings, was_single_string)`` or raise :class:`InputError`."""
    if texts is None:
        raise InputError(f"{what} is None; pass a string or a list of strings")
    if isinstance(texts, str):
        return [texts], True
    if isinstance(texts, (bytes, bytearray)):
        raise InputError(f"{what} is bytes; decode it to str first")
    if not isinstance(texts, Sequence) and not hasattr(texts, "__iter__"):
        raise InputError(f"{what} must be a string or a list of strings, got {type(texts).__name__}")
    _refuse_unordered(texts, what, "a list of strings, e.g. df['text'].tolist() or list(d.values())")
    items = list(texts)  # type: ignore[call-overload]
    if not items:
        raise InputError(f"{what} is empty; pass at least one string")
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise InputError(f"{what}[{index}] is {type(item).__name__} ({item!r:.60}), not a string")
    return items, False


def as_pair_list(pairs: object) -> tuple[list[tuple[str, str]], bool]:
    """Return ``(list_of_(query, passage), was_single_pair)`` or raise :class:`InputError`."""
    if pairs is None:
        raise InputError("sentence_pairs is None; pass a (query, passage) pair or a list of them")
    if isinstance(pairs, str):
        raise InputError("sentence_pairs is a single string; pass a (query, passage) pair or a list of them")
    if not isinstance(pairs, Sequence) and not hasattr(pairs, "__iter__"):
        raise InputError(f"sentence_pairs must be a list of (query, passage) pairs, got {type(pairs).__name__}")
    _refuse_unordered(pairs, "sentence_pairs", "a list of (query, passage) pairs, e.g. df[['query', 'passage']].values")
    items = list(pairs)  # type: ignore[call-overload]
    if not items:
        raise InputError("sentence_pairs is empty; pass at least one (query, passage) pair")
    items = [x.item() if getattr(x, "ndim", None) == 0 else x for x in items]  # numpy scalars: one pair's texts
    # FlagEmbedding's rule: a first item that is a string makes the whole input one pair
    single = isinstance(items[0], str)
    if single:
        if len(items) != 2:
            raise InputError(
                f"sentence_pairs starts with a string, so it is read as one (query, passage) pair, but it has "
                f"{len(items)} items; pass a (query, passage) pair or a list of them"
            )
        if not isinstance(items[1], str):
            raise InputError(
                f"sentence_pairs is one (query, passage) pair whose passage is {type(items[1]).__name__}, not a string"
            )
        items = [items]
    out = []
    for index, pair in enumerate(items):
        if hasattr(pair, "tolist") and not isinstance(pair, str):  # a numpy row (``df[["q", "p"]].values``)
            pair = pair.tolist()
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise InputError(f"sentence_pairs[{index}] must be a (query, passage) pair, got {pair!r:.80}")
        query, passage = pair
        for name, value in (("query", query), ("passage", passage)):
            if not isinstance(value, str):
                raise InputError(f"sentence_pairs[{index}] {name} is {type(value).__name__}, not a string")
        out.append((query, passage))
    return out, single
