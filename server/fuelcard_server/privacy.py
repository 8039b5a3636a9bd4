"""Masking of personal data in answers and logs."""

from __future__ import annotations

import re


def mask_phone(phone: str) -> str:
    """'13812345678' -> '138****5678'."""
    if len(phone) < 7:
        return "*" * len(phone)
    return phone[:3] + "*" * (len(phone) - 7) + phone[-4:]


def mask_id_number(id_number: str) -> str:
    """'110101199003071234' -> '1101**********1234'."""
    if len(id_number) < 8:
        return "*" * len(id_number)
    return id_number[:4] + "*" * (len(id_number) - 8) + id_number[-4:]


# Long digit runs in free text: card numbers (16-19), ID numbers (15-18),
# phone numbers (11). Logged text passes through this before it is written.
_DIGIT_RUN = re.compile(r"\d{11,19}[Xx]?")


def scrub(text: str) -> str:
    return _DIGIT_RUN.sub(lambda m: m.group(0)[:3] + "***" + m.group(0)[-2:], text)
