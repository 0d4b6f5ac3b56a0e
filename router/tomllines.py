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


_STRING = re.compile(r"'[^']*'" r'|"(?:[^"\\]|\\.)*"')


def _code(line: str) -> str:
    """`line` with string contents blanked and its comment cut, offsets unchanged, so that a
    bracket, brace or `=` inside a string or comment is not taken for structure."""
    out = _STRING.sub(lambda m: m.group(0)[0] + " " * (len(m.group(0)) - 2) + m.group(0)[-1],
                      line)
    cut = out.find("#")
    return out if cut < 0 else out[:cut]


def _scan_array(line: str, start: int, path: Path, count: int, depth: int, lineno: int,
                lines: dict[Path, int]) -> tuple[int, int]:
    """Place the inline-table elements of an array found on `line` from `start` on.

    `depth` counts open brackets and braces; an element is a `{` directly inside the array
    (depth 1), so tables or arrays nested in an element neither start elements nor close the
    array. Returns the new element count and depth (0: the array is closed)."""
    code = _code(line)
    elem_start: int | None = None
    for i in range(start, len(code)):
        ch = code[i]
        if ch in "[{":
            if ch == "{" and depth == 1:
                elem_start = i
            depth += 1
        elif ch in "]}":
            depth -= 1
            if ch == "}" and depth == 1 and elem_start is not None:
                _place_inline(line, code, elem_start, i, (*path, count), lineno, lines)
                elem_start, count = None, count + 1
            if depth == 0:
                break
    if elem_start is not None:  # an element left open: place what we have
        _place_inline(line, code, elem_start, len(code), (*path, count), lineno, lines)
        count += 1
    return count, depth


def _place_inline(line: str, code: str, start: int, end: int, path: Path, lineno: int,
                  lines: dict[Path, int]) -> None:
    lines.setdefault(path, lineno)
    for m in _INLINE_KEY.finditer(code, start, end):
        lines.setdefault((*path, line[m.start(1):m.end(1)].strip('"')), lineno)


def key_lines(text: str) -> dict[Path, int]:
    lines: dict[Path, int] = {}
    array_index: dict[tuple[str, ...], int] = {}
    prefix: list[str | int] = []
    open_array: tuple[Path, int, int] | None = None  # (array path, elements, depth)
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
            path, count, depth = open_array
            count, depth = _scan_array(line, 0, path, count, depth, lineno, lines)
            open_array = (path, count, depth) if depth > 0 else None
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
            code = _code(line)
            for m in _INLINE_KEY.finditer(code, key.start(2)):
                lines.setdefault((*path, line[m.start(1):m.end(1)].strip('"')), lineno)
        elif value.startswith("["):
            count, depth = _scan_array(line, key.start(2), path, 0, 0, lineno, lines)
            if depth > 0:
                open_array = (path, count, depth)
    return lines


def line_of(lines: dict[Path, int], path: Path) -> int | None:
    """The line of `path`, or of its nearest ancestor that was placed."""
    p = tuple(path)
    while p:
        if p in lines:
            return lines[p]
        p = p[:-1]
    return None
