"""Checks on request fields, as pure functions.

Each check appends FieldViolations; a handler raises one INVALID_ARGUMENT
naming all of them before anything touches the database.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Container
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from fuelcard_server import cards
from fuelcard_server.errors import FieldViolation, invalid

REQUEST_ID_MAX_CHARS = 64
NAME_MAX_CHARS = 100
TEXT_MAX_CHARS = 200
ID_MAX_CHARS = 64
PAGE_SIZE_MAX = 500
PAGE_SIZE_DEFAULT = 50
NOZZLE_MAX = 999
# google.protobuf.Timestamp's range: 0001-01-01 .. 9999-12-31 (here from the
# epoch on: no fuel card event is older).
TIMESTAMP_MAX_S = 253402300800
NANOS_PER_S = 1_000_000_000


def printable(value: str, *, multiline: bool = False) -> bool:
    """No control characters (NUL among them: PostgreSQL text cannot hold
    it). A multi-line field (a note, a description) may hold line breaks
    and tabs."""
    if multiline:
        value = value.replace("\r\n", "").replace("\n", "").replace("\t", "")
    return value.isprintable()


class Violations:
    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str, reason: str) -> None:
        self.items.append(FieldViolation(field, description, reason))

    def raise_if_any(self) -> None:
        if self.items:
            raise invalid(self.items)

    def request_id(self, value: str, field: str = "request_id") -> None:
        if not value:
            self.add(field, "request_id is required", "REQUEST_ID_MISSING")
        elif len(value) > REQUEST_ID_MAX_CHARS or not (
            value.isascii() and value.isprintable() and " " not in value
        ):
            self.add(field, "1-64 printable ASCII characters without spaces",
                     "REQUEST_ID_MALFORMED")

    def amount(self, field: str, value: int, maximum: int, *, allow_zero: bool = False) -> None:
        if value < 0 or (value == 0 and not allow_zero):
            self.add(field, "must be positive" if not allow_zero else "must not be negative",
                     "AMOUNT_NOT_POSITIVE" if not allow_zero else "AMOUNT_NEGATIVE")
        elif value > maximum:
            self.add(field, f"must be at most {maximum}", "AMOUNT_TOO_LARGE")

    def non_negative(self, field: str, value: int, maximum: int) -> None:
        if value < 0:
            self.add(field, "must not be negative", "VALUE_NEGATIVE")
        elif value > maximum:
            self.add(field, f"must be at most {maximum}", "VALUE_TOO_LARGE")

    def step_up(self, field: str, request: Any) -> uuid.UUID | None:
        """The challenge id of a request's StepUp (`field`), if it carries
        one; its code must be 6 digits."""
        if not request.HasField(field):
            return None
        step_up = getattr(request, field)
        challenge = self.uuid(f"{field}.challenge_id", step_up.challenge_id)
        code = step_up.code
        if not (len(code) == 6 and code.isascii() and code.isdigit()):
            self.add(f"{field}.code", "must be the 6-digit code", "STEP_UP_CODE_MALFORMED")
        return challenge

    def uuid(self, field: str, value: str) -> uuid.UUID | None:
        if not value:
            self.add(field, "is required", "ID_MISSING")
            return None
        try:
            parsed = uuid.UUID(value)
            # Only the canonical 8-4-4-4-12 form (any case): uuid.UUID also
            # takes "urn:...", braces and hyphens anywhere, which PostgreSQL
            # refuses or reads differently.
            if str(parsed) != value.lower():
                raise ValueError
            return parsed
        except ValueError:
            self.add(field, "must be a UUID", "ID_MALFORMED")
            return None

    def card_number(self, field: str, value: str) -> None:
        # Never echo the number: the description says what is wrong only.
        if not value:
            self.add(field, "is required", "CARD_NUMBER_MISSING")
        elif not cards.is_valid_pan(value):
            self.add(field, "must be 16-19 digits with a valid check digit",
                     "CARD_NUMBER_MALFORMED")

    def text(self, field: str, value: str, *, required: bool, max_chars: int,
             multiline: bool = False) -> None:
        if required and not value.strip():
            self.add(field, "is required", "FIELD_MISSING")
        elif len(value) > max_chars:
            self.add(field, f"must be at most {max_chars} characters", "FIELD_TOO_LONG")
        elif not printable(value, multiline=multiline):
            self.add(field, "must not contain control characters" + (
                " other than line breaks and tabs" if multiline else ""), "FIELD_MALFORMED")

    def timestamp(self, field: str, stamp: Any) -> dt.datetime | None:
        """A google.protobuf.Timestamp as an aware UTC datetime: seconds from
        the epoch to the end of year 9999, nanos 0-999 999 999."""
        if not (0 <= stamp.seconds < TIMESTAMP_MAX_S and 0 <= stamp.nanos < NANOS_PER_S):
            self.add(field, "must be a real date", "TIME_INVALID")
            return None
        value: dt.datetime = stamp.ToDatetime(tzinfo=dt.UTC)
        return value

    def enum(self, field: str, value: int, allowed: Container[int]) -> None:
        if value not in allowed:
            self.add(field, "must be one of the defined values (not UNSPECIFIED)",
                     "ENUM_VALUE_INVALID")

    def page_size(self, field: str, value: int) -> int:
        if value < 0 or value > PAGE_SIZE_MAX:
            self.add(field, f"must be 0-{PAGE_SIZE_MAX}", "PAGE_SIZE_INVALID")
            return PAGE_SIZE_DEFAULT
        return value or PAGE_SIZE_DEFAULT

    def page_token(self, field: str, value: str) -> int | None:
        """Page tokens are the last id seen, as decimal text."""
        if not value:
            return None
        if not (value.isascii() and value.isdigit() and len(value) <= 19
                and int(value) <= 2**63 - 1):  # a bigint id
            self.add(field, "must be a token from a previous response", "PAGE_TOKEN_INVALID")
            return None
        return int(value)


# Where bytes that protobuf refused to parse went wrong (upb says only
# "Wire format was corrupt" or "String field had bad UTF-8", never where).
_NOT_UTF8 = ("is a string whose bytes are not valid UTF-8", "FIELD_NOT_UTF8")
_CORRUPT = ("is not valid protobuf wire format (truncated, or a bad tag or length)",
            "WIRE_FORMAT_CORRUPT")
# Bounds on the search, which runs on the event loop: a request is at most
# 1 MiB, and a corrupt one must not buy much time with tiny fields. Past
# them the whole request is named ("").
LOCATE_FIELDS_MAX = 20_000
LOCATE_DEPTH_MAX = 100  # upb's own recursion limit


def undecodable(descriptor: Descriptor, data: bytes) -> FieldViolation:
    """The field of `data` (bytes that do not parse as a `descriptor`
    message) where decoding fails, as a path such as `lines[3].account_id`:
    a string that is not UTF-8, or wire format that is corrupt. Field ""
    when the fault is in no field (a bad tag at the top level) or the search
    gives up."""
    budget = [LOCATE_FIELDS_MAX]
    found = _locate(descriptor, data, "", 0, budget)
    if found is None:
        found = ("", *_CORRUPT)
    return FieldViolation(*found)


def _varint(data: bytes, pos: int) -> tuple[int, int] | None:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None


def _locate(descriptor: Descriptor, data: bytes, path: str, depth: int,
            budget: list[int]) -> tuple[str, str, str] | None:
    corrupt_here = (path, *_CORRUPT)
    if depth > LOCATE_DEPTH_MAX:
        return corrupt_here
    seen: dict[int, int] = {}
    pos = 0
    while pos < len(data):
        budget[0] -= 1
        if budget[0] < 0:
            return ("", *_CORRUPT)
        key = _varint(data, pos)
        if key is None or key[0] >> 3 == 0:
            return corrupt_here
        number, wire_type, pos = key[0] >> 3, key[0] & 7, key[1]
        fd = descriptor.fields_by_number.get(number)
        field = path
        if fd is not None:
            field = f"{path}.{fd.name}" if path else fd.name
            if fd.is_repeated and fd.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_STRING,
                                              FieldDescriptor.TYPE_BYTES):
                index = seen.get(number, 0)
                seen[number] = index + 1
                field = f"{field}[{index}]"
        if wire_type == 0:
            value = _varint(data, pos)
            if value is None:
                return (field, *_CORRUPT)
            pos = value[1]
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            if pos > len(data):
                return (field, *_CORRUPT)
        elif wire_type == 2:
            length = _varint(data, pos)
            if length is None or length[1] + length[0] > len(data):
                return (field, *_CORRUPT)
            start, pos = length[1], length[1] + length[0]
            if fd is None:
                continue
            if fd.type == FieldDescriptor.TYPE_STRING:
                try:
                    data[start:pos].decode("utf-8")
                except UnicodeDecodeError:
                    return (field, *_NOT_UTF8)
            elif fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type is not None:
                inner = _locate(fd.message_type, data[start:pos], field, depth + 1, budget)
                if inner is not None:
                    return inner
        else:  # groups (3, 4: not in proto3) and the undefined 6 and 7
            return (field, *_CORRUPT)
    return None
