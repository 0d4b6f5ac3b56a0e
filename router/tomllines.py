"""Map TOML key paths to the line they are written on.

`tomllib` gives values but no positions; an admin needs "line 42" to find a mistake. This is
a small line scanner, not a second TOML parser: it understands table headers, arrays of
tables, dotted keys, inline tables and multi-line arrays of inline tables, which is all a
router.toml uses. Paths it cannot place fall back to their nearest placed parent.
"""

from __future__ import annotations

import re

Path = tuple[str | int, ...]

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_BARE = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
_KEY = re.compile(rf"^\s*({_BARE}(?:\s*\.\s*{_BARE})*)\s*=\s*(.*)$")
_INLINE_KEY = re.compile(r"""(?:^|[{,])\s*([A-Za-z0-9_-]+|"[^"]*")\s*=""")


def _split_dotted(key: str) -> list[str]:
    parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", key)
    return [p.strip("\"'") for p in parts]


def key_lines(text: str) -> dict[Path, int]:
    lines: dict[Path, int] = {}
    array_index: dict[tuple[str, ...], int] = {}
    prefix: list[str | int] = []
    open_array: tuple[Path, int] | None = None  # (path of the array key, element count)
    in_multiline: str | None = None

    def resolve(keys: list[str]) -> list[str | int]:
        out: list[str | int] = []
        plain: list[str] = []
        for k in keys:
            out.append(k)
            plain.append(k)
            idx = array_index.get(tuple(plain))
            if idx is not None:
                out.append(idx)
        return out

    for lineno, line in enumerate(text.splitlines(), start=1):
        if in_multiline:
            if in_multiline in line:
                in_multiline = None
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if open_array is not None:
            path, count = open_array
            for _ in re.finditer(r"\{", line):
                elem: Path = (*path, count)
                lines.setdefault(elem, lineno)
                for m in _INLINE_KEY.finditer(line[line.index("{"):]):
                    lines.setdefault((*elem, m.group(1).strip('"')), lineno)
                count += 1
            open_array = (path, count)
            if "]" in line and "{" not in line.split("]")[-1]:
                open_array = None
            continue
        header = _HEADER.match(line)
        if header and not _KEY.match(line):
            keys = _split_dotted(header.group(2))
            if header.group(1) == "[[":
                plain = tuple(keys)
                array_index[plain] = array_index.get(plain, -1) + 1
                # Child array indexes count per parent element, so a new parent element
                # starts its children from zero again.
                deeper = [k for k in array_index if len(k) > len(plain) and k[:len(plain)] == plain]
                for other in deeper:
                    del array_index[other]
            prefix = resolve(keys)
            lines.setdefault(tuple(prefix), lineno)
            continue
        key = _KEY.match(line)
        if not key:
            continue
        path = (*prefix, *_split_dotted(key.group(1)))
        lines.setdefault(path, lineno)
        value = key.group(2).strip()
        for quote in ('"""', "'''"):
            if value.startswith(quote) and value.count(quote) == 1:
                in_multiline = quote
        if value.startswith("{"):
            for m in _INLINE_KEY.finditer(value):
                lines.setdefault((*path, m.group(1).strip('"')), lineno)
        elif value.startswith("["):
            count = 0
            for _ in re.finditer(r"\{", value):
                lines.setdefault((*path, count), lineno)
                count += 1
            for m in _INLINE_KEY.finditer(value):
                lines.setdefault((*path, 0, m.group(1).strip('"')), lineno)
            if value.count("[") > value.count("]"):
                open_array = (path, count)
    return lines


def line_of(lines: dict[Path, int], path: Path) -> int | None:
    """The line of `path`, or of its nearest ancestor that was placed."""
    p = tuple(path)
    while p:
        if p in lines:
            return lines[p]
        p = p[:-1]
    return None
