"""The fleet manager's forms, read into the core's messages: amounts in yuan
into fen, litres into millilitres, and a card's scope of use (stations,
products, hours, a typed geo-fence) into the CardScope that SetCardScope
takes. Everything here is pure (no I/O), so the rules are tested without a
browser; a bad field is a FormError naming the field and saying, in
Chinese, what is wrong with it."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from fuelcard.v1 import common_pb2, control_pb2

from fuelcard_console.ops_labels import PRODUCTS_ZH

# The core's own bounds (server/fuelcard_server/services/control.py), checked
# here too so that the form names the field before anything is sent.
MAX_LIMIT_FEN = 10**12
MAX_SCOPE_STATIONS = 200
MAX_POLYGON_VERTICES = 200
MAX_RADIUS_M = 2_000_000
MAX_LABEL_CHARS = 50

_YUAN = re.compile(r"\d{1,10}(\.\d{1,2})?")
_LITRES = re.compile(r"\d{1,7}(\.\d{1,3})?")
_HOUR_WINDOW = re.compile(r"(\d{1,2}):(\d{2})\s*[-–~至]\s*(\d{1,2}):(\d{2})")
_STATION_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class FormError(ValueError):
    """A field of a form that cannot be sent: which one, and why (zh-CN)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def yuan_to_fen(text: str, field: str, *, allow_zero: bool = True) -> int:
    """'123.45' -> 12345. Exact (no floats): at most two decimals."""
    cleaned = text.strip().replace(",", "").replace("，", "")
    if cleaned.startswith("¥") or cleaned.startswith("￥"):
        cleaned = cleaned[1:].strip()
    if not _YUAN.fullmatch(cleaned):
        raise FormError(field, "金额格式不对：请填写元，最多两位小数，如 300 或 125.50")
    try:
        fen = int(Decimal(cleaned) * 100)
    except InvalidOperation:  # pragma: no cover - the pattern admits only numbers
        raise FormError(field, "金额格式不对") from None
    if fen == 0 and not allow_zero:
        raise FormError(field, "金额必须大于 0")
    if fen > MAX_LIMIT_FEN:
        raise FormError(field, "金额过大")
    return fen


def optional_yuan(text: str | None, field: str) -> int:
    """A cap in yuan; empty (or 0) means no cap, as the core's 0 does."""
    if text is None or not text.strip():
        return 0
    return yuan_to_fen(text, field)


def optional_litres(text: str | None, field: str) -> int:
    """A cap in litres, as millilitres; empty (or 0) means no cap."""
    if text is None or not text.strip():
        return 0
    cleaned = text.strip()
    if not _LITRES.fullmatch(cleaned):
        raise FormError(field, "升数格式不对：最多三位小数，如 60 或 45.5")
    return int(Decimal(cleaned) * 1000)


def fen_to_yuan(fen: int) -> str:
    """12345 -> '123.45' (with thousands separators), exactly."""
    sign = "-" if fen < 0 else ""
    whole, cents = divmod(abs(fen), 100)
    return f"{sign}{whole:,}.{cents:02d}"


def ml_to_litres(ml: int) -> str:
    """12345 -> '12.35' litres (two decimals, half up, enough on a page)."""
    return f"{(Decimal(ml) / 1000).quantize(Decimal('0.01'), rounding=ROUND_HALF_UP):,}"


def spending_limits(form: Mapping[str, str]) -> control_pb2.SpendingLimits:
    return control_pb2.SpendingLimits(
        per_transaction_fen=optional_yuan(form.get("limit_txn"), "limit_txn"),
        daily_fen=optional_yuan(form.get("limit_daily"), "limit_daily"),
        monthly_fen=optional_yuan(form.get("limit_monthly"), "limit_monthly"))


def volume_limits(form: Mapping[str, str]) -> control_pb2.VolumeLimits:
    return control_pb2.VolumeLimits(
        per_fill_ml=optional_litres(form.get("litre_fill"), "litre_fill"),
        daily_ml=optional_litres(form.get("litre_daily"), "litre_daily"),
        monthly_ml=optional_litres(form.get("litre_monthly"), "litre_monthly"))


def plate(text: str | None) -> str:
    """A vehicle's label (its plate), required, up to 50 characters."""
    value = (text or "").strip()
    if not value:
        raise FormError("label", "请填写车牌号")
    if len(value) > MAX_LABEL_CHARS:
        raise FormError("label", f"车牌号最多 {MAX_LABEL_CHARS} 个字符")
    return value


def stations(text: str | None) -> list[str]:
    """Station ids separated by commas, spaces or new lines."""
    items = [s for s in re.split(r"[\s,，;；]+", text or "") if s]
    if len(items) > MAX_SCOPE_STATIONS:
        raise FormError("stations", f"最多 {MAX_SCOPE_STATIONS} 个油站")
    for item in items:
        if not _STATION_ID.fullmatch(item):
            raise FormError("stations", "油站编号只能含字母、数字和 . _ : -")
    return list(dict.fromkeys(items))  # each once, in the order typed


def products(values: Iterable[str]) -> list[common_pb2.Product.ValueType]:
    out: list[common_pb2.Product.ValueType] = []
    for value in values:
        try:
            number = int(value)
        except ValueError:
            raise FormError("products", "未知油品") from None
        if number not in PRODUCTS_ZH:
            raise FormError("products", "未知油品")
        out.append(common_pb2.Product.ValueType(number))
    return list(dict.fromkeys(out))


def hour_windows(text: str | None) -> list[control_pb2.HourWindow]:
    """'07:00-19:00, 22:00-06:00' -> windows in minutes after midnight; an
    end before the start wraps past midnight, as the core reads it; 24:00
    is the end of the day."""
    out = []
    for part in [p for p in re.split(r"[,，;；\n]+", text or "") if p.strip()]:
        m = _HOUR_WINDOW.fullmatch(part.strip())
        if m is None:
            raise FormError("hours", "时段格式应为 HH:MM-HH:MM，多个时段用逗号分隔")
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        start, end = h1 * 60 + m1, h2 * 60 + m2
        if h1 > 23 or m1 > 59 or m2 > 59 or end > 1440:
            raise FormError("hours", "时间不对：小时 0-24，分钟 0-59")
        end = end or 1440  # 00:00 as an end: midnight
        if start == end:
            raise FormError("hours", "时段的开始和结束不能相同")
        out.append(control_pb2.HourWindow(start_minute=start, end_minute=end))
    return out


def _coordinate(text: str | None, field: str, bound: float) -> float:
    try:
        value = float((text or "").strip())
    except ValueError:
        raise FormError(field, "请填写十进制度数，如 25.0389") from None
    if not -bound <= value <= bound or value != value:
        raise FormError(field, f"必须在 -{bound:g} 到 {bound:g} 之间")
    return value


def geofence(form: Mapping[str, str]) -> control_pb2.GeoFence | None:
    """The typed geo-fence (电子围栏): none, a circle (centre and radius in
    metres) or a polygon (one 'lat,lng' vertex a line, at least three)."""
    kind = form.get("fence", "none")
    if kind in ("", "none"):
        return None
    if kind == "circle":
        center = control_pb2.GeoPoint(latitude=_coordinate(form.get("fence_lat"), "fence_lat", 90),
                                      longitude=_coordinate(form.get("fence_lng"), "fence_lng", 180))
        radius_text = (form.get("fence_radius_m") or "").strip()
        if not radius_text.isdigit() or not 0 < int(radius_text) <= MAX_RADIUS_M:
            raise FormError("fence_radius_m", f"半径为 1 到 {MAX_RADIUS_M} 米的整数")
        return control_pb2.GeoFence(circle=control_pb2.GeoCircle(center=center,
                                                                 radius_m=int(radius_text)))
    if kind == "polygon":
        vertices = []
        for line in [x for x in (form.get("fence_polygon") or "").splitlines() if x.strip()]:
            parts = [p for p in re.split(r"[\s,，]+", line.strip()) if p]
            if len(parts) != 2:
                raise FormError("fence_polygon", "每行一个顶点：纬度,经度")
            vertices.append(control_pb2.GeoPoint(latitude=_coordinate(parts[0], "fence_polygon", 90),
                                                 longitude=_coordinate(parts[1], "fence_polygon", 180)))
        if not 3 <= len(vertices) <= MAX_POLYGON_VERTICES:
            raise FormError("fence_polygon", f"多边形需要 3 到 {MAX_POLYGON_VERTICES} 个顶点")
        return control_pb2.GeoFence(polygon=control_pb2.GeoPolygon(vertices=vertices))
    raise FormError("fence", "未知的围栏类型")


@dataclass(frozen=True)
class ControlsForm:
    """A card's controls as a form sets them: money caps, litre caps, scope."""

    limits: control_pb2.SpendingLimits
    volume: control_pb2.VolumeLimits
    scope: control_pb2.CardScope

    @property
    def has_limits(self) -> bool:
        lim = self.limits
        return bool(lim.per_transaction_fen or lim.daily_fen or lim.monthly_fen)

    @property
    def has_volume(self) -> bool:
        vol = self.volume
        return bool(vol.per_fill_ml or vol.daily_ml or vol.monthly_ml)

    @property
    def has_scope(self) -> bool:
        s = self.scope
        return bool(s.station_ids or s.products or s.geofences or s.hours)


@dataclass(frozen=True)
class VehicleForm(ControlsForm):
    """Everything the 'issue a vehicle card' form asks for."""

    label: str = ""
    holder_name: str = ""
    funding_mode: int = 0  # account_pb2.FundingMode


def controls_form(form: Mapping[str, str], chosen_products: Iterable[str]) -> ControlsForm:
    return ControlsForm(limits=spending_limits(form), volume=volume_limits(form),
                        scope=card_scope(form, chosen_products))


def card_scope(form: Mapping[str, str], chosen_products: Iterable[str]) -> control_pb2.CardScope:
    fence = geofence(form)
    return control_pb2.CardScope(
        station_ids=stations(form.get("stations")), products=products(chosen_products),
        geofences=[fence] if fence is not None else [], hours=hour_windows(form.get("hours")))


def vehicle_form(form: Mapping[str, str], chosen_products: Iterable[str]) -> VehicleForm:
    from fuelcard.v1 import account_pb2

    label = plate(form.get("label"))
    driver = (form.get("holder_name") or "").strip()
    if len(driver) > 100:
        raise FormError("holder_name", "驾驶员姓名最多 100 个字符")
    mode = form.get("funding_mode", "allocated")
    if mode not in ("allocated", "shared"):
        raise FormError("funding_mode", "资金方式只能是“独立额度”或“共用车队余额”")
    controls = controls_form(form, chosen_products)
    return VehicleForm(
        limits=controls.limits, volume=controls.volume, scope=controls.scope,
        label=label, holder_name=driver or label,
        funding_mode=account_pb2.FUNDING_MODE_ALLOCATED if mode == "allocated"
        else account_pb2.FUNDING_MODE_SHARED)


def describe_hours(minutes: list[int]) -> str:
    """The core's stored [start, end, start, end, ...] as '07:00-19:00'."""
    pairs = zip(minutes[0::2], minutes[1::2], strict=False)
    return "，".join(f"{s // 60:02d}:{s % 60:02d}-{e // 60:02d}:{e % 60:02d}" for s, e in pairs)


def _yuan_field(fen: int) -> str:
    whole, cents = divmod(fen, 100)
    return f"{whole}.{cents:02d}".removesuffix(".00") if fen else ""


def _litre_field(ml: int) -> str:
    if not ml:
        return ""
    whole, rest = divmod(ml, 1000)
    return f"{whole}.{rest:03d}".rstrip("0") if rest else str(whole)


def prefill(limits: control_pb2.SpendingLimits, volume: control_pb2.VolumeLimits,
            stations_now: list[str] | None, fences_json: Any, hours_now: list[int] | None
            ) -> dict[str, str]:
    """The controls form filled with what is in force: the caps, and the
    scope as the database keeps it (fc.cards: fences as JSON, hours as
    [start, end, ...] minutes). Only the first fence can be shown in the form."""
    values = {
        "limit_txn": _yuan_field(limits.per_transaction_fen), "limit_daily": _yuan_field(limits.daily_fen),
        "limit_monthly": _yuan_field(limits.monthly_fen), "litre_fill": _litre_field(volume.per_fill_ml),
        "litre_daily": _litre_field(volume.daily_ml), "litre_monthly": _litre_field(volume.monthly_ml),
        "stations": ", ".join(stations_now or []),
        "hours": describe_hours(list(hours_now or [])).replace("，", ", "), "fence": "none"}
    fences = fences_json or []
    if fences:
        first = fences[0]
        if "circle" in first:
            lat, lng, radius = first["circle"]
            values |= {"fence": "circle", "fence_lat": f"{lat:g}", "fence_lng": f"{lng:g}",
                       "fence_radius_m": str(int(radius))}
        elif "polygon" in first:
            values |= {"fence": "polygon",
                       "fence_polygon": "\n".join(f"{lat:g},{lng:g}" for lat, lng in first["polygon"])}
    return values
