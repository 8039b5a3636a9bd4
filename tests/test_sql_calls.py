"""Every call of a stored function from Python passes its arguments by name.

A positional call (`fc.authorize(%s, %s, ...)` with 13 placeholders) breaks
silently when a parameter is added, removed or reordered in the function's
SQL file: the values shift into the wrong parameters, and a text or bigint
lands where another one of the same type was meant. Named notation
(`fc.authorize(p_amount_fen => %(amount_fen)s::bigint, ...)`) turns each of
those edits into an error at the first call. This test holds the Python side
to that: it reads the string literals of every Python file under server/,
clients/, loadtest/ and tests/, finds each `fc.<name>(` / `fc_pan_*.<name>(`
call in them, and checks it against pg_proc in a migrated database: the
function exists, every argument is passed by name, every name is one of the
function's parameters (and none twice), and every parameter without a default
is passed.

String literals (not the raw source) are scanned: Python comments and
docstrings (prose about the calls) are not SQL; implicitly concatenated
literals arrive as one string, so a call spread over several source lines is
read whole. A call must open and close inside one literal, so that it can be
checked; one built at run time (f-string, `+` of variables) is not seen, and
the reviewer is the check there.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("server", "clients", "loadtest", "tests")
# This file holds deliberately bad calls (the scanner's self-test below).
THIS_FILE = Path(__file__).resolve()

# schema, function name, the opening parenthesis
CALL = re.compile(r"\b(fc|fc_pan_\w+)\.(\w+)\s*\(")
# `fc.x(` right after one of these words is not a call: a definition
# (CREATE/DROP/ALTER/COMMENT ON FUNCTION, CREATE TRIGGER ... EXECUTE
# FUNCTION) or a table's column list (INSERT INTO, COPY, REFERENCES, CREATE INDEX
# ... ON, CREATE TABLE, CREATE TYPE ... AS).
NOT_A_CALL = re.compile(r"\b(FUNCTION|PROCEDURE|INTO|COPY|REFERENCES|ON|TABLE|TYPE)\s*$", re.IGNORECASE)
NAMED_ARG = re.compile(r"\s*([A-Za-z_]\w*)\s*=>")

SIGNATURES_SQL = """
    SELECT n.nspname, p.proname,
           (SELECT coalesce(array_agg(a.name ORDER BY a.n), '{}')
              FROM unnest(coalesce(p.proargnames, '{}'::text[]),
                          coalesce(p.proargmodes, '{}'::"char"[])::text[]) WITH ORDINALITY
                   AS a(name, mode, n)
             WHERE a.mode IS NULL OR a.mode IN ('i', 'b', 'v')),
           p.pronargs, p.pronargdefaults
      FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
     WHERE n.nspname = 'fc' OR n.nspname LIKE 'fc\\_pan\\_%'"""


@dataclass(frozen=True)
class Signature:
    inputs: tuple[str, ...]  # the input parameters' names, in order
    required: frozenset[str]  # those without a default


@dataclass(frozen=True)
class Call:
    where: str  # path:line
    function: str  # schema.name
    args: tuple[str, ...]  # the argument list split at its top-level commas


def signatures(conn: psycopg.Connection[tuple[object, ...]]) -> dict[str, list[Signature]]:
    found: dict[str, list[Signature]] = {}
    for schema, name, inputs, nargs, ndefaults in conn.execute(SIGNATURES_SQL).fetchall():
        assert isinstance(inputs, list) and isinstance(nargs, int) and isinstance(ndefaults, int)
        names = tuple("" if i is None else str(i) for i in inputs)
        if len(names) < nargs:  # an unnamed parameter: it can only be passed by position
            names += ("",) * (nargs - len(names))
        found.setdefault(f"{schema}.{name}", []).append(
            Signature(names, frozenset(names[:nargs - ndefaults])))
    return found


def _blank_sql_noise(text: str) -> str:
    """`text` with SQL comments and the insides of quoted literals and
    identifiers blanked (same length, so offsets still match): commas,
    parentheses and `fc.` in them are neither arguments nor calls."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("--", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            out[i:end] = " " * (end - i)
            i = end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out[i:end] = " " * (end - i)
            i = end
        elif c in "'\"":
            j = i + 1
            while j < n:
                if text[j] == c:
                    if text.startswith(c * 2, j):  # '' or "" inside: an escaped quote
                        j += 2
                        continue
                    break
                j += 1
            out[i + 1:j] = " " * (j - i - 1)
            i = j + 1
        else:
            i += 1
    return "".join(out)


def _arguments(text: str, open_at: int) -> tuple[str, ...] | None:
    """The top-level comma-separated arguments of the call whose "(" is at
    `open_at`; None if the parenthesis is not closed in `text`."""
    depth = 0
    start = open_at + 1
    args: list[str] = []
    for i in range(open_at, len(text)):
        c = text[i]
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
            if depth == 0:
                last = text[start:i]
                if args or last.strip():
                    args.append(last)
                return tuple(args)
        elif c == "," and depth == 1:
            args.append(text[start:i])
            start = i + 1
    return None


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                ids.add(id(body[0].value))
    return ids


def calls_in_source(source: str, path: str) -> tuple[list[Call], list[str]]:
    """The stored-function calls in the string literals of one Python
    source, and the problems found while reading them (a call not closed
    in its literal)."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    calls: list[Call] = []
    problems: list[str] = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in skip:
            continue
        text = _blank_sql_noise(node.value)
        for m in CALL.finditer(text):
            if NOT_A_CALL.search(text, 0, m.start()):
                continue
            where = f"{path}:{node.lineno + text.count(chr(10), 0, m.start())}"
            function = f"{m.group(1)}.{m.group(2)}"
            args = _arguments(text, m.end() - 1)
            if args is None:
                problems.append(f"{where}: {function}( is not closed in the same string literal,"
                                " so its arguments cannot be checked")
                continue
            calls.append(Call(where, function, args))
    return calls, problems


def check(call: Call, known: dict[str, list[Signature]]) -> str | None:
    """What is wrong with `call`, or None."""
    overloads = known.get(call.function)
    if not overloads:
        return f"{call.where}: {call.function} does not exist"
    names: list[str] = []
    for i, arg in enumerate(call.args):
        m = NAMED_ARG.match(arg)
        if m is None:
            return (f"{call.where}: {call.function} gets argument {i + 1} ({arg.strip()!r}) by"
                    " position; pass it by name (p_x => ...)")
        names.append(m.group(1))
    if len(set(names)) < len(names):
        return f"{call.where}: {call.function} gets a parameter twice: {sorted(names)}"
    errors = []
    for sig in overloads:
        unknown = sorted(set(names) - set(sig.inputs))
        missing = sorted(sig.required - set(names))
        if not unknown and not missing:
            return None
        errors.append(f"no parameter {unknown} (it has {list(sig.inputs)})" if unknown
                      else f"missing {missing}")
    return f"{call.where}: {call.function}: " + "; ".join(errors)


def python_sources() -> list[Path]:
    files = []
    for top in SCANNED:
        files += [p for p in sorted((ROOT / top).rglob("*.py"))
                  if p.resolve() != THIS_FILE and "node_modules" not in p.parts]
    return files


def test_every_stored_function_call_passes_its_arguments_by_name(
        db: psycopg.Connection[tuple[object, ...]]) -> None:
    known = signatures(db)
    assert "fc.authorize" in known and "fc_pan_seg1.put" in known  # the lookup reads pg_proc
    calls: list[Call] = []
    problems: list[str] = []
    for path in python_sources():
        found, unreadable = calls_in_source(path.read_text(), str(path.relative_to(ROOT)))
        calls += found
        problems += unreadable
    problems += [p for p in (check(c, known) for c in calls) if p is not None]
    assert problems == [], "\n".join(problems)
    # The scan did find the calls of the money path (a scanner that finds
    # nothing passes trivially).
    called = {c.function for c in calls}
    assert {"fc.authorize", "fc.confirm", "fc.cancel", "fc.recharge", "fc.consume_step_up",
            "fc.hold_json"} <= called, sorted(called)
    assert len(calls) > 60, len(calls)


BAD_SOURCE = '''
"""A docstring may say fc.authorize(...) in prose: not SQL, not checked."""
POSITIONAL = "SELECT fc.cancel(%s, %s, %s, %s::uuid, %s::timestamptz, %s, %s::bigint)"
MIXED = ("SELECT fc.cancel(p_caller => %(caller)s, %(request_id)s, p_request_hash => %(h)s,"
         " p_hold_uid => %(hold)s::uuid, p_now => now(), p_terminal => '', p_counter => 0)")
MISSPELT = ("SELECT fc.cancel(p_caller => %(caller)s, p_request_id => %(request_id)s,"
            " p_request_hash => %(h)s, p_hold_id => %(hold)s::uuid, p_now => now(),"
            " p_terminal => '', p_counter => 0)")
MISSING = "SELECT fc.step_up_sent(p_uid => %(uid)s::uuid)"
TWICE = "SELECT fc.step_up_not_sent(p_uid => %(a)s::uuid, p_uid => %(b)s::uuid)"
NO_SUCH = "SELECT fc.authorise(p_caller => 'x')"
NESTED = "SELECT fc.sm3(p_data => fc.audit_canonical(1, now(), 'a', 'm', NULL, 'OK'))"
ROW_ARG = "SELECT fc.hold_json(h) FROM fc.holds h"
UNCLOSED = "SELECT fc.recharge_json(r => "
# Not calls: a definition, a column list, a literal, a comment.
FINE = """
    CREATE OR REPLACE FUNCTION fc.evaluate_tiers(p_now timestamptz, x int) RETURNS int;
    INSERT INTO fc.stations (station_id, name) VALUES ('fc.authorize(1, 2)', 'n');
    SELECT 'fc.cancel(%s)'::text -- fc.confirm(1, 2)
    /* fc.confirm(3) */, fc.business_tz(), fc.system_account(p_code => 'A,B(')
"""
'''


def test_the_scanner_finds_positional_misspelt_and_missing_arguments(
        db: psycopg.Connection[tuple[object, ...]]) -> None:
    known = signatures(db)
    calls, problems = calls_in_source(BAD_SOURCE, "bad.py")
    found = [(int(c.where.split(":")[1]), check(c, known)) for c in calls]
    by_line = {line: p for line, p in found if p is not None}
    # line numbers of BAD_SOURCE (line 1 is its empty first line); on line
    # 12, fc.sm3's own call is right and only fc.audit_canonical's is wrong
    assert sorted(line for line, p in found if p is not None) == [3, 4, 6, 9, 10, 11, 12, 13], found
    assert "argument 1 ('%s') by position" in by_line[3]
    assert "argument 2 ('%(request_id)s') by position" in by_line[4]
    assert "no parameter ['p_hold_id']" in by_line[6]
    assert "missing ['p_now']" in by_line[9]
    assert "gets a parameter twice" in by_line[10]
    assert "fc.authorise does not exist" in by_line[11]
    assert "fc.audit_canonical gets argument 1 ('1') by position" in by_line[12]
    assert "fc.hold_json gets argument 1 ('h') by position" in by_line[13]
    assert problems == ["bad.py:14: fc.recharge_json( is not closed in the same string literal,"
                        " so its arguments cannot be checked"]
    # the fine lines were read: their two calls are found and pass
    fine = [c for c in calls if int(c.where.split(":")[1]) >= 16]
    assert sorted(c.function for c in fine) == ["fc.business_tz", "fc.system_account"]
    assert [check(c, known) for c in fine] == [None, None]
    assert [c.args for c in fine if c.function == "fc.system_account"] == [
        ("p_code => '    '",)]
