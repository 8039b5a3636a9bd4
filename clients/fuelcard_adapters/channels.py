"""The channels known to the adapters: name -> how to read its files."""

from __future__ import annotations

from dataclasses import dataclass

from fuelcard.v1 import funding_pb2

from fuelcard_adapters import alipay, bankcard, ecny, wechat
from fuelcard_adapters.framework import BillParser


@dataclass(frozen=True)
class ChannelFiles:
    channel: int
    encoding: str
    parse_bill: BillParser


CHANNELS: dict[str, ChannelFiles] = {
    "BANK_CARD": ChannelFiles(funding_pb2.CHANNEL_BANK_CARD, bankcard.ENCODING, bankcard.parse_bill),
    "WECHAT_PAY": ChannelFiles(funding_pb2.CHANNEL_WECHAT_PAY, "utf-8-sig", wechat.parse_bill),
    "ALIPAY": ChannelFiles(funding_pb2.CHANNEL_ALIPAY, alipay.ENCODING, alipay.parse_bill),
    "ECNY": ChannelFiles(funding_pb2.CHANNEL_ECNY, ecny.ENCODING, ecny.parse_bill),
}


def by_name(name: str) -> ChannelFiles:
    """'wechat_pay', 'WECHAT_PAY' or 'CHANNEL_WECHAT_PAY'; KeyError otherwise."""
    return CHANNELS[name.upper().removeprefix("CHANNEL_")]
