"""The SQL source files read as statements: which function each file defines,
with its body, so a test can hold the database against the tree.

The splitter knows what PostgreSQL scripts contain here: `--` and `/* */`
comments, quoted strings and identifiers, and dollar-quoted bodies; a `;`
outside those ends a statement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DOLLAR = re.compile(r"\$([A-Za-z_][A-Za-z_0-9]*)?\$")
_FUNCTION = re.compile(
    r"CREATE\s+(?:OR\s+REPLACE\s+)?(FUNCTION|PROCEDURE)\s+([\w.]+)\s*\(", re.IGNORECASE)
_DEFINES_LOGIC = re.compile(
    r"\bCREATE\s+(?:OR\s+REPLACE\s+)?(?:CONSTRAINT\s+)?(FUNCTION|PROCEDURE|TRIGGER|VIEW)\b",
    re.IGNORECASE)


@dataclass(frozen=True)
class Statement:
    text: str  # from its first keyword through its `;`
    line: int  # where it starts, 1-based


@dataclass(frozen=True)
class FunctionDefinition:
    name: str  # schema-qualified, as written
    body: str  # the text PostgreSQL stores as prosrc
    line: int


def _skip_quoted(sql: str, i: int) -> int:
    """`i` is at an opening quote, comment or dollar tag: the index past its end."""
    if sql.startswith("--", i):
        end = sql.find("\n", i)
        return len(sql) if end < 0 else end + 1
    if sql.startswith("/*", i):
        end = sql.find("*/", i + 2)
        return len(sql) if end < 0 else end + 2
    quote = sql[i]
    if quote in "'\"":
        j = i + 1
        while j < len(sql):
            if sql[j] == quote:
                if sql.startswith(quote * 2, j):
                    j += 2
                    continue
                return j + 1
            j += 1
        raise ValueError(f"unterminated {quote} at offset {i}")
    tag = _DOLLAR.match(sql, i)
    assert tag is not None
    end = sql.find(tag.group(0), tag.end())
    if end < 0:
        raise ValueError(f"unterminated {tag.group(0)} at offset {i}")
    return end + len(tag.group(0))


def _opens_quote(sql: str, i: int) -> bool:
    c = sql[i]
    if c in "'\"" or sql.startswith("--", i) or sql.startswith("/*", i):
        return True
    return c == "$" and _DOLLAR.match(sql, i) is not None and not (
        i > 0 and (sql[i - 1].isalnum() or sql[i - 1] == "_"))


def strip_comments(sql: str) -> str:
    """The text with comments blanked out (strings and bodies kept)."""
    out, i = [], 0
    while i < len(sql):
        if _opens_quote(sql, i):
            end = _skip_quoted(sql, i)
            chunk = sql[i:end]
            is_comment = chunk.startswith(("--", "/*"))
            out.append(re.sub(r"[^\n]", " ", chunk) if is_comment else chunk)
            i = end
        else:
            out.append(sql[i])
            i += 1
    return "".join(out)


def statements(sql: str) -> list[Statement]:
    found, i, start = [], 0, None
    while i < len(sql):
        if _opens_quote(sql, i):
            if start is None and not sql.startswith(("--", "/*"), i):
                start = i
            i = _skip_quoted(sql, i)
            continue
        c = sql[i]
        if start is None and not c.isspace():
            start = i
        if c == ";" and start is not None:
            found.append(Statement(sql[start:i + 1], sql.count("\n", 0, start) + 1))
            start = None
        i += 1
    if start is not None and sql[start:].strip():
        found.append(Statement(sql[start:], sql.count("\n", 0, start) + 1))
    return found


def _body(text: str) -> str:
    """The body of a CREATE FUNCTION: the string after AS (dollar- or single-quoted)."""
    for m in re.finditer(r"\bAS\s+", text, re.IGNORECASE):
        j = m.end()
        if text.startswith("'", j):
            return text[j + 1:_skip_quoted(text, j) - 1].replace("''", "'")
        tag = _DOLLAR.match(text, j)
        if tag is not None:
            return text[tag.end():_skip_quoted(text, j) - len(tag.group(0))]
    raise ValueError(f"no body in: {text[:80]}")


def functions(sql: str) -> list[FunctionDefinition]:
    """Every CREATE FUNCTION / PROCEDURE statement of a script, in order."""
    found = []
    for stmt in statements(sql):
        m = _FUNCTION.match(stmt.text)
        if m:
            found.append(FunctionDefinition(m.group(2).lower(), _body(stmt.text), stmt.line))
    return found


def defines_logic(sql: str) -> list[str]:
    """What a schema migration must not hold: CREATE FUNCTION, PROCEDURE,
    TRIGGER or VIEW anywhere outside comments, even inside a DO block."""
    return [m.group(0) for m in _DEFINES_LOGIC.finditer(strip_comments(sql))]
