"""Substrings a phrase pattern cannot match without: a cheap pre-filter for the phrase table.

Pure, run once at import. `needles(pattern)` returns literal strings of which at least
one occurs in every text the pattern matches, or None when no such set can be read off
the pattern. Checking `any(n in text for n in needles)` (a C substring search each) lets
the classifier skip most of the ~40 reason patterns for a reply without changing a
result: a pattern is searched whenever one of its needles is present.
It reads the small regex dialect of mtad.dsn.phrases: literal characters, escapes,
character classes, groups (incl. (?:...), look-arounds), alternation and quantifiers.
Anything it does not understand makes it give up (None), which only costs speed.
"""

from __future__ import annotations

MIN_NEEDLE = 3  # shorter literals occur in nearly every reply: no use as a filter
_CLASS_ESCAPES = frozenset("bBdDsSwWAZ")
_QUANTIFIERS = frozenset("?*+{")


def needles(pattern: str) -> tuple[str, ...] | None:
    """Literals of which one must occur in any text `pattern` matches; None if unknown."""
    try:
        found = _alternation(pattern)
    except (IndexError, ValueError):
        return None
    if found is None or any(len(n) < MIN_NEEDLE for n in found):
        return None
    return tuple(dict.fromkeys(found))


def _split_top(pattern: str) -> list[str]:
    """`pattern` split at the `|` that are not inside a group or a class."""
    out: list[str] = []
    depth = 0
    start = 0
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            i = _class_end(pattern, i)
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            out.append(pattern[start:i])
            start = i + 1
        i += 1
    out.append(pattern[start:])
    return out


def _alternation(pattern: str) -> list[str] | None:
    branches = _split_top(pattern)
    found: list[str] = []
    for branch in branches:
        need = _sequence(branch)
        if need is None:
            return None
        found.extend(need)
    return found


def _sequence(branch: str) -> list[str] | None:
    """The best requirement of a branch: its longest literal run, or a required group's needles."""
    candidates: list[list[str]] = []
    run: list[str] = []
    i = 0
    n = len(branch)

    def flush() -> None:
        if run:
            candidates.append(["".join(run)])
            run.clear()

    while i < n:
        c = branch[i]
        if c == "(":
            end = _group_end(branch, i)
            body = branch[i + 1 : end]
            i = end + 1
            optional = i < n and _optional_quantifier(branch, i)
            i = _skip_quantifier(branch, i)
            if body.startswith("?") and not body.startswith("?:"):
                continue  # a look-around matches no text: the literal run goes on
            flush()
            body = body.removeprefix("?:")
            if not optional:
                inner = _alternation(body)
                if inner is not None:
                    candidates.append(inner)
            continue
        if c == "[":
            i = _skip_quantifier(branch, _class_end(branch, i))
            flush()
            continue
        if c == "\\":
            char = branch[i + 1]
            i += 2
            if char.isalnum():
                if char in _CLASS_ESCAPES or char.isdigit():
                    flush()
                    i = _skip_quantifier(branch, i)
                    continue
                raise ValueError(char)  # \n, \t, \x..: not in our dialect
        elif c in ".^$":
            flush()
            i = _skip_quantifier(branch, i + 1)
            continue
        elif c in _QUANTIFIERS or c == ")":
            raise ValueError(c)
        else:
            char = c
            i += 1
        if i < n and branch[i] in _QUANTIFIERS:
            optional = _optional_quantifier(branch, i)
            i = _skip_quantifier(branch, i)
            if optional:
                flush()
                continue
            run.append(char)
            flush()
            continue
        run.append(char)
    flush()
    usable = [c for c in candidates if c and min(len(x) for x in c) >= MIN_NEEDLE]
    if not usable:
        return None
    return max(usable, key=lambda c: (min(len(x) for x in c), -len(c)))


def _optional_quantifier(text: str, i: int) -> bool:
    c = text[i]
    if c in "?*":
        return True
    if c == "{":
        return text[i + 1 : i + 2] in ("0", ",")
    return False


def _skip_quantifier(text: str, i: int) -> int:
    if i < len(text) and text[i] in _QUANTIFIERS:
        if text[i] == "{":
            close = text.index("}", i)
            i = close + 1
        else:
            i += 1
        if i < len(text) and text[i] in "?+":
            i += 1  # lazy or possessive
    return i


def _class_end(text: str, i: int) -> int:
    """Index just past the `]` closing the class that opens at `i`."""
    j = i + 1
    if j < len(text) and text[j] == "^":
        j += 1
    if j < len(text) and text[j] == "]":
        j += 1
    while text[j] != "]":
        j += 2 if text[j] == "\\" else 1
    return j + 1


def _group_end(text: str, i: int) -> int:
    """Index of the `)` closing the group that opens at `i`."""
    depth = 0
    j = i
    while True:
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "[":
            j = _class_end(text, j)
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return j
        j += 1
