"""Monthly statements (月结对账单) of a fleet or a family: the lines from the
statement rollup (fc.statement_lines_rolled, statement_rollup.py) or, while
it lags far behind, from the month's journal (fc.statement_lines), whole or
one page at a time with the whole month's totals; and the same as CSV or as
a PDF in Chinese (always every line).

The PDF is drawn with fpdf2 (pure Python, embeds a subset of a TrueType/
OpenType font, so Chinese text is real text a reader can search and copy)
in Noto Sans CJK SC, Debian's fonts-noto-cjk (scripts/bootstrap installs it).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import uuid
from dataclasses import dataclass
from pathlib import Path

from fuelcard_server import errors
from fuelcard_server.db import Database
from fuelcard_server.invoices import litres, yuan
from fuelcard_server.rollups import ROLLUP_MAX_LAG
from fuelcard_server.validation import Violations

ACCOUNT_SQL = (
    "SELECT a.id, a.parent_id, coalesce(h.name, '') FROM fc.accounts a"
    " LEFT JOIN fc.account_holders h ON h.account_id = a.id WHERE a.uid = %(uid)s AND a.kind <> 100")
BOUNDS_SQL = ("SELECT fc.month_start(p_month => %(month)s::date),"
              " fc.month_start(p_month => (%(month)s::date + interval '1 month')::date)")
# A page token is the internal id of the page's last account; it must be of this family.
TOKEN_SQL = ("SELECT 1 FROM fc.accounts WHERE id = %(after)s"
             " AND (id = %(account)s OR parent_id = %(account)s)")

# The statement rollup's lag (statement_rollup.py): within rollups.ROLLUP_MAX_LAG a statement
# reads it, else the month's journal (fc.statement_lines).
LAG_SQL = ("SELECT coalesce((SELECT max(id) FROM fc.journal), 0)"
           " - (SELECT rolled_id FROM fc.statement_rollup_state)")

# In one statement (one snapshot, so the page and the totals agree): the totals of every line
# (part 0; its second column is the line count), then one page of lines (part 1; the second
# column is the line's account's internal id, the page token) in the statement's order (the
# top-level account first, then the sub-accounts by label, uid), after the account %(after)s
# (NULL: from the first), at most %(limit)s (NULL: all).
_LINES_HEAD = "WITH l AS MATERIALIZED (SELECT * FROM "
_FROM_ROLLUP = "fc.statement_lines_rolled(p_account_id => %(account)s, p_month => %(month)s::date)"
_FROM_JOURNAL = "fc.statement_lines(p_account_id => %(account)s, p_month => %(month)s::date)"
_LINES_TAIL = """),
    after AS (SELECT a.parent_id IS NOT NULL AS sub, a.label, a.uid FROM fc.accounts a
               WHERE a.id = %(after)s::bigint)
    SELECT 0, count(*), NULL::uuid, '', false,
           coalesce(sum(l.opening_fen), 0)::bigint, coalesce(sum(l.recharges_fen), 0)::bigint,
           coalesce(sum(l.transfers_fen), 0)::bigint, coalesce(sum(l.sales_fen), 0)::bigint,
           coalesce(sum(l.sales_volume_ml), 0)::bigint, coalesce(sum(l.sale_count), 0)::bigint,
           coalesce(sum(l.sales_charged_fen), 0)::bigint, coalesce(sum(l.refunds_fen), 0)::bigint,
           coalesce(sum(l.other_fen), 0)::bigint, coalesce(sum(l.closing_fen), 0)::bigint
      FROM l
    UNION ALL
    (SELECT 1, a.id, l.* FROM l JOIN fc.accounts a ON a.uid = l.account_uid
      WHERE %(after)s::bigint IS NULL
         OR (NOT l.top_level, l.label, l.account_uid) > (SELECT sub, label, uid FROM after)
      ORDER BY NOT l.top_level, l.label, l.account_uid
      LIMIT %(limit)s::bigint)"""
ROLLUP_LINES_SQL = _LINES_HEAD + _FROM_ROLLUP + _LINES_TAIL
JOURNAL_LINES_SQL = _LINES_HEAD + _FROM_JOURNAL + _LINES_TAIL

# Where Debian's fonts-noto-cjk puts the font, and the face of the collection to use.
CJK_FONT = Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc")
CJK_FACE = "Noto Sans CJK SC"


@dataclass(frozen=True)
class Line:
    account_id: str
    label: str
    top_level: bool
    opening_fen: int
    recharges_fen: int
    transfers_fen: int
    sales_fen: int
    sales_volume_ml: int
    sale_count: int
    sales_charged_fen: int
    refunds_fen: int
    other_fen: int
    closing_fen: int


@dataclass(frozen=True)
class Statement:
    account_id: str
    holder_name: str
    month: str
    start: dt.datetime
    end: dt.datetime
    # every line, or one page of them (statement(..., page_size=n))
    lines: list[Line]
    # the sums of every line of the month, paged or not: the journal's, to the fen
    totals: Line
    # how many lines the whole statement has
    line_count: int
    # the internal id of the last line's account when more lines follow it (the page token)
    next_after: int | None = None


def parse_month(text: str) -> dt.date | None:
    """YYYY-MM as the month's first day; None if it is not one."""
    try:
        day = dt.date.fromisoformat(f"{text}-01") if len(text) == 7 else None
    except ValueError:
        return None
    return day if day is not None and 2000 <= day.year <= 2999 else None


async def statement(db: Database, account_uid: uuid.UUID, month: dt.date, *,
                    page_size: int = 0, after: int | None = None,
                    max_lag: int | None = ROLLUP_MAX_LAG) -> Statement:
    """The month's statement of a top-level account: every line (page_size
    0), or page_size lines after the account `after` (a page token); the
    totals are the whole month's either way. From the statement rollup while
    it lags by at most max_lag journal ids, else (or with max_lag None) from
    the month's journal: the same lines to the fen."""
    row = await db.fetch_one(ACCOUNT_SQL, {"uid": account_uid})
    if row is None:
        raise errors.not_found("ACCOUNT_NOT_FOUND", "account")
    account, parent, name = row
    if parent is not None:
        raise errors.failed_precondition("NOT_A_TOP_LEVEL_ACCOUNT")
    if after is not None and await db.fetch_one(
            TOKEN_SQL, {"after": after, "account": account}) is None:
        v = Violations()
        v.add("page_token", "must be a token from a previous response", "PAGE_TOKEN_INVALID")
        v.raise_if_any()
    sql = JOURNAL_LINES_SQL
    if max_lag is not None:
        lag = await db.fetch_one(LAG_SQL, {})
        assert lag is not None
        if lag[0] <= max_lag:
            sql = ROLLUP_LINES_SQL
    rows = await db.fetch_all(sql, {
        "account": account, "month": month, "after": after,
        # one more than asked: whether a next page follows
        "limit": page_size + 1 if page_size else None})
    bounds = await db.fetch_one(BOUNDS_SQL, {"month": month})
    assert bounds is not None
    totals = next(r for r in rows if r[0] == 0)
    page = [r for r in rows if r[0] == 1]
    next_after = None
    if page_size and len(page) > page_size:
        page = page[:page_size]
        next_after = int(page[-1][1])
    return Statement(
        str(account_uid), name, month.strftime("%Y-%m"), bounds[0], bounds[1],
        [Line(str(r[2]), r[3], r[4], *r[5:]) for r in page], Line("", "", False, *totals[5:]),
        int(totals[1]), next_after)


CSV_HEADER = ("账户ID", "车牌/标签", "期初余额", "充值", "划拨", "消费金额", "消费升数", "消费笔数",
              "余额扣款", "退款", "其他", "期末余额")


def _row(line: Line, name: str) -> list[str]:
    return [line.account_id, name, yuan(line.opening_fen), yuan(line.recharges_fen),
            yuan(line.transfers_fen), yuan(line.sales_fen), litres(line.sales_volume_ml) or "0.000",
            str(line.sale_count), yuan(line.sales_charged_fen), yuan(line.refunds_fen),
            yuan(line.other_fen), yuan(line.closing_fen)]


def _label(line: Line) -> str:
    return "主账户" if line.top_level else line.label


def to_csv(s: Statement) -> bytes:
    """UTF-8 with a byte order mark (spreadsheet programs read Chinese then),
    amounts in yuan with two decimals, a totals row last."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\r\n")
    w.writerow(["月结对账单", s.holder_name, s.month])
    w.writerow(CSV_HEADER)
    for line in s.lines:
        w.writerow(_row(line, _label(line)))
    w.writerow(_row(s.totals, "合计"))
    return ("\ufeff" + out.getvalue()).encode("utf-8")


def _cjk_face_index(path: Path) -> int:
    from fontTools.ttLib import TTCollection

    with TTCollection(str(path), lazy=True) as collection:
        for i, font in enumerate(collection.fonts):
            if font["name"].getDebugName(1) == CJK_FACE:
                return i
    return 0


PDF_COLUMNS = (("车牌/标签", 34), ("期初余额", 24), ("充值", 22), ("划拨", 22), ("消费金额", 24),
               ("升数", 22), ("笔数", 14), ("余额扣款", 24), ("退款", 20), ("其他", 18),
               ("期末余额", 24))


def to_pdf(s: Statement, font: Path = CJK_FONT) -> bytes:
    """A4 landscape, one row per account and a totals row, in Chinese."""
    from fpdf import FPDF

    if not font.exists():
        raise errors.failed_precondition("CJK_FONT_MISSING")
    pdf = FPDF(orientation="L", unit="mm", format="A4")
    pdf.set_auto_page_break(auto=True, margin=12)
    pdf.add_font("cjk", fname=str(font), collection_font_number=_cjk_face_index(font))
    pdf.add_page()
    pdf.set_font("cjk", size=14)
    pdf.cell(text=f"月结对账单 {s.month}", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("cjk", size=9)
    pdf.cell(text=f"客户: {s.holder_name}    账户: {s.account_id}    单位: 元 / 升",
             new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)

    def row(cells: list[str]) -> None:
        for (_, width), text in zip(PDF_COLUMNS, cells, strict=True):
            pdf.cell(w=width, h=6, text=text, border=1, align="R" if text[:1].isdigit()
                     or text[:1] == "-" else "L")
        pdf.ln()

    row([name for name, _ in PDF_COLUMNS])
    for line in [*s.lines, s.totals]:
        cells = _row(line, _label(line) if line.account_id else "合计")[1:]
        row(cells)
    return bytes(pdf.output())
