"""G2A's merchant contract at the edge: parse and validate what G2A sends, render what we answer (pure)."""
import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from .errors import ContractError

INT64_MAX = 2**63 - 1
MAX_LINES = 100
MAX_QUANTITY = 1000
ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # always fullmatch: `$` also matches before a final \n


@dataclass(frozen=True)
class Line:
    product_id: int
    quantity: int
    unit_price: Decimal | None = None


def bad(message):
    return ContractError(400, "BR02", message)


def parse_json(raw):
    """The request body as JSON, or 400 BR01."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
        data = json.loads(text)
        if "\\u" in text:
            # "\ud800" is valid JSON but a lone surrogate is not text: no database, log or hash could take it.
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        return data
    except (UnicodeError, ValueError, RecursionError):
        raise ContractError(400, "BR01", "the request body is not valid JSON") from None


def parse_int64(value, field):
    """A positive int64, given as a JSON integer or a numeric string (never a bool or a float)."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and len(value.strip()) <= 19:
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= INT64_MAX:
        raise bad(f"{field} must be a positive 64-bit integer")
    return value


def parse_price(value, field):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise bad(f"{field} must be a decimal amount")
    try:
        price = Decimal(str(value).strip())
    except InvalidOperation:
        raise bad(f"{field} must be a decimal amount") from None
    if not price.is_finite() or price < 0 or price > Decimal("1000000"):
        raise bad(f"{field} must be a decimal amount between 0 and 1000000")
    return price


def parse_line(entry, index):
    where = f"[{index}]"
    if not isinstance(entry, dict):
        raise bad(f"{where} must be an object with product_id and quantity")
    product_id = parse_int64(entry.get("product_id"), f"{where}.product_id")
    quantity = entry.get("quantity")
    if isinstance(quantity, bool) or not isinstance(quantity, int) or not 0 < quantity <= MAX_QUANTITY:
        raise bad(f"{where}.quantity must be an integer from 1 to {MAX_QUANTITY}")
    extra = entry.get("additional_data") or {}
    if not isinstance(extra, dict):
        raise bad(f"{where}.additional_data must be an object")
    return Line(product_id, quantity, parse_price(extra.get("unit_price"), f"{where}.additional_data.unit_price"))


def parse_reservation(raw):
    """POST/PUT /reservation body: a JSON array of lines (a single object is accepted as one line).

    Two lines for the same product are merged, keeping the lowest unit price, so the loss guard sees the worst case.
    """
    data = parse_json(raw)
    entries = [data] if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise bad("the body must be a non-empty array of {product_id, quantity}")
    if len(entries) > MAX_LINES:
        raise bad(f"at most {MAX_LINES} lines per reservation")
    merged = {}
    for index, entry in enumerate(entries):
        line = parse_line(entry, index)
        merged[line.product_id] = _merge(merged.get(line.product_id), line)
    return list(merged.values())


def _merge(old, new):
    if old is None:
        return new
    prices = [p for p in (old.unit_price, new.unit_price) if p is not None]
    return Line(new.product_id, old.quantity + new.quantity, min(prices) if prices else None)


def parse_order(raw):
    """POST /order body -> (reservation_id, g2a_order_id)."""
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise bad("the body must be an object with reservation_id and g2a_order_id")
    reservation_id = data.get("reservation_id")
    if not isinstance(reservation_id, str) or not ID_PATTERN.fullmatch(reservation_id):
        raise bad("reservation_id must be a string of at most 64 characters")
    return reservation_id, parse_int64(data.get("g2a_order_id"), "g2a_order_id")


def check_id(value, what):
    """A path id we issued (or G2A's numeric id); anything else is simply not found."""
    if not ID_PATTERN.fullmatch(value or ""):
        raise ContractError(404, "BR02", f"{what} not found")
    return value


def stock_entry(product_id, inventory_size, inventory=None):
    entry = {"product_id": product_id, "inventory_size": max(0, int(inventory_size))}
    if inventory is not None:
        entry["inventory"] = inventory
    return entry


def error_body(code, message):
    return {"code": code, "message": message}
