"""Invoices for the invoicing service provider (数电发票): the document the
provider receives, and the provider itself, an interface with a development
implementation.

The database decides what an invoice says (sql/functions/tax_invoices.sql:
items, list, tax); this module only turns a recorded invoice into the
provider's JSON, with quantities and unit prices as the invoice prints them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Protocol

# Invoice kinds and types as stored (fc.invoices) and as in invoice.proto.
KIND_RECHARGE = 1
KIND_CONSUMPTION = 2
TYPE_ORDINARY = 1
TYPE_SPECIAL = 2

# What the 数电 platform calls the invoice types.
TYPE_NAMES = {TYPE_ORDINARY: "普通发票", TYPE_SPECIAL: "增值税专用发票"}
NOT_TAXED = "不征税"
UNIT_PRICE_PLACES = Decimal("0.00000001")


def yuan(fen: int) -> str:
    """Fen as yuan with two decimals, exactly (no float)."""
    sign = "-" if fen < 0 else ""
    whole, part = divmod(abs(fen), 100)
    return f"{sign}{whole}.{part:02d}"


def litres(ml: int) -> str:
    """Millilitres as litres with three decimals; empty for none."""
    if ml <= 0:
        return ""
    whole, part = divmod(ml, 1000)
    return f"{whole}.{part:03d}"


def unit_price(amount_fen: int, quantity_ml: int) -> str:
    """Unit price before tax in yuan per litre, 8 decimals, rounded half up:
    amount / quantity, so that quantity x price comes back to the amount
    within the platform's tolerance."""
    if quantity_ml <= 0:
        return ""
    price = Decimal(amount_fen) * 10 / Decimal(quantity_ml)
    return str(price.quantize(UNIT_PRICE_PLACES, rounding=ROUND_HALF_UP))


def tax_rate(rate_bp: int | None) -> str:
    if not rate_bp:
        return NOT_TAXED
    return f"{Decimal(rate_bp) / 100:f}".rstrip("0").rstrip(".") + "%"


def document(inv: dict[str, Any]) -> dict[str, Any]:
    """The invoice as the provider receives it: the 数电发票 fields (seller,
    buyer, items with tax classification code, quantity, unit price,
    amount, rate and tax), and the list of a consolidated invoice. Amounts
    in yuan strings with two decimals, as the platform takes them."""
    items = [{
        "xh": t["line_no"],  # 序号
        "xmmc": t["name"],  # 项目名称
        "sphfwssflbm": t["tax_code"],  # 商品和服务税收分类编码
        "dw": t["unit"],  # 单位
        "sl": litres(t["quantity_ml"]),  # 数量
        "dj": unit_price(t["amount_fen"], t["quantity_ml"]),  # 单价 (不含税)
        "je": yuan(t["amount_fen"]),  # 金额
        "slv": tax_rate(t["tax_rate_bp"]),  # 税率
        "se": yuan(t["tax_fen"]),  # 税额
        # 不征税 items carry the preferential-policy marker the platform asks for
        "yhzcbs": "1" if not t["tax_rate_bp"] else "0",
        "zzstsgl": NOT_TAXED if not t["tax_rate_bp"] else "",
    } for t in inv["items"]]
    entries = [{
        "xh": e["line_no"], "cph": e["label"], "xmmc": e["name"], "sl": litres(e["quantity_ml"]),
        "je": yuan(e["amount_fen"]), "se": yuan(e["tax_fen"]), "jshj": yuan(e["total_fen"]),
    } for e in inv.get("entries", [])]
    return {
        "fpqqlsh": inv["invoice_id"],  # 发票请求流水号: the provider dedupes on it
        "fppz": TYPE_NAMES[inv["type"]],  # 发票票种
        "xsfmc": inv["seller_name"], "xsfnsrsbh": inv["seller_taxpayer_id"],  # 销售方
        "gmfmc": inv["buyer_name"], "gmfnsrsbh": inv["buyer_taxpayer_id"],  # 购买方
        "hjje": yuan(inv["amount_fen"]), "hjse": yuan(inv["tax_fen"]),  # 合计金额, 合计税额
        "jshj": yuan(inv["total_fen"]),  # 价税合计
        "sfhz": bool(entries),  # 是否汇总开具 (with a 清单)
        "mxxx": items,  # 明细信息
        "qdxx": entries,  # 清单信息
        "bz": f"{inv['month']} 加油消费" if inv["kind"] == KIND_CONSUMPTION else "预付卡充值",
    }


def document_json(inv: dict[str, Any]) -> str:
    return json.dumps(document(inv), ensure_ascii=False, sort_keys=True)


class InvoiceProvider(Protocol):
    """An invoicing service provider (a 数电发票 platform's API). Both calls
    are idempotent on the document's fpqqlsh (the invoice id): a retry after
    a lost answer gets the same number."""

    async def issue(self, doc: dict[str, Any]) -> str:
        """Issue the invoice; its number (发票号码)."""
        ...

    async def reverse(self, doc: dict[str, Any], number: str, reason: str) -> str:
        """Issue the red-letter invoice reversing invoice `number`; its number."""
        ...


class DirectoryInvoiceProvider:
    """Development provider: writes each document to a directory as JSON and
    "issues" it with a fake 20-digit number derived from the invoice id (so a
    retry gets the same one, as from a real provider)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @staticmethod
    def number(invoice_id: str, red: bool) -> str:
        digest = hashlib.sha256(f"{invoice_id}:{'red' if red else 'blue'}".encode()).digest()
        return f"{int.from_bytes(digest[:8], 'big') % 10**20:020d}"

    def _write(self, name: str, body: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, ensure_ascii=False, indent=2, sort_keys=True), "utf-8")
        tmp.replace(path)

    async def issue(self, doc: dict[str, Any]) -> str:
        number = self.number(doc["fpqqlsh"], red=False)
        await asyncio.to_thread(self._write, f"{doc['fpqqlsh']}.json", {**doc, "fphm": number})
        return number

    async def reverse(self, doc: dict[str, Any], number: str, reason: str) -> str:
        red = self.number(doc["fpqqlsh"], red=True)
        await asyncio.to_thread(self._write, f"{doc['fpqqlsh']}.red.json",
                                {**doc, "fphm": red, "dylzfphm": number, "chyy": reason})
        return red
