"""The products.json mapping: parse and validate it, store it in the database, reload it when it changes.

Rows removed from the file are kept with mapped=False; sync deactivates their offers.
"""
import json
import logging
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from . import db
from .errors import ConfigError
from .log import event

log = logging.getLogger(__name__)

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
CAMEL = {"cwsProductId": "cws_product_id", "g2aProductId": "g2a_product_id", "fixedProfit": "fixed_profit",
         "feePercentage": "fee_percentage", "minPrice": "min_price", "maxPrice": "max_price",
         "maxStock": "max_stock"}
PRODUCT_KEYS = {"cws_product_id", "g2a_product_id", "fixed_profit", "fee_percentage", "min_price",
                "max_price", "max_stock", "enabled"}
DEFAULT_KEYS = {"fixed_profit", "fee_percentage"}
# Free-text keys an operator may add for their own notes.
NOTE_KEYS = {"name", "comment", "note"}
CHUNK = 500  # rows per bulk statement (SQLite's bound-variable limit)
REFUSED_KEY = "products.refused"  # setting: {"file", "problems"} while the file on disk is refused


@dataclass(frozen=True, slots=True)
class Mapping:
    cws_product_id: str
    g2a_product_id: int
    fixed_profit: Decimal
    fee: Decimal
    min_price: Decimal | None = None
    max_price: Decimal | None = None
    max_stock: int | None = None
    enabled: bool = True


def load_mapping(path, default_profit, default_fee):
    """Read and validate products.json; raise ConfigError naming every bad entry and field."""
    path = Path(path)
    checker = _Checker(path.name)
    data = checker.parse(_read(path))
    products, defaults = checker.split(data)
    default_profit = checker.money(defaults, "fixed_profit", "defaults", default_profit)
    default_fee = checker.fee(defaults, "fee_percentage", "defaults", default_fee)
    mappings = [checker.entry(item, f"products[{i}]", default_profit, default_fee)
                for i, item in enumerate(products)]
    checker.duplicates(mappings)
    if checker.problems:
        raise ConfigError(checker.problems)
    return mappings


def _read(path):
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None


class _Checker:
    """Validates the parsed file field by field, collecting every problem."""

    def __init__(self, name):
        self.name = name
        self.problems = []

    def problem(self, where, why):
        self.problems.append(f"{self.name}: {where}: {why}")

    def parse(self, text):
        try:
            return json.loads(text, parse_float=Decimal, parse_constant=_reject_constant)
        except ValueError as exc:
            raise ConfigError([f"{self.name}: not valid JSON: {exc}"]) from None

    def split(self, data):
        """(products list, defaults dict) from either the object form or a bare array."""
        if isinstance(data, list):
            return data, {}
        if not isinstance(data, dict):
            raise ConfigError([f"{self.name}: must be an object with \"products\" or an array of products"])
        self.unknown(data, {"defaults", "products"}, "top level")
        products = data.get("products")
        if not isinstance(products, list):
            raise ConfigError([f"{self.name}: products: must be an array of products, got {_show(products)}"])
        defaults = data.get("defaults") or {}
        if not isinstance(defaults, dict):
            self.problem("defaults", f"must be an object, got {_show(defaults)}")
            return products, {}
        return products, self.normalise(defaults, DEFAULT_KEYS, "defaults")

    def normalise(self, item, allowed, where):
        """snake_case keys, camelCase accepted; a field given in both spellings is a problem."""
        fields = {}
        for key, value in item.items():
            name = CAMEL.get(key, key)
            if name in fields:
                self.problem(f"{where}.{name}", "given twice (snake_case and camelCase)")
            fields[name] = value
        self.unknown(fields, allowed, where)
        return fields

    def unknown(self, fields, allowed, where):
        for key in fields:
            if key not in allowed and key not in NOTE_KEYS and not str(key).startswith("_"):
                self.problem(where, f"unknown field {key!r}")

    def entry(self, item, where, default_profit, default_fee):
        if not isinstance(item, dict):
            self.problem(where, f"must be an object, got {_show(item)}")
            return None
        fields = self.normalise(item, PRODUCT_KEYS, where)
        mapping = Mapping(
            cws_product_id=self.cws_id(fields, where),
            g2a_product_id=self.g2a_id(fields, where),
            fixed_profit=self.money(fields, "fixed_profit", where, default_profit),
            fee=self.fee(fields, "fee_percentage", where, default_fee),
            min_price=self.money(fields, "min_price", where, None),
            max_price=self.money(fields, "max_price", where, None),
            max_stock=self.count(fields, "max_stock", where),
            enabled=self.flag(fields, "enabled", where))
        if mapping.min_price is not None and mapping.max_price is not None and mapping.min_price > mapping.max_price:
            self.problem(f"{where}.min_price", f"{mapping.min_price} is above max_price {mapping.max_price}")
        return mapping

    def cws_id(self, fields, where):
        value = fields.get("cws_product_id")
        if value is None:
            self.problem(f"{where}.cws_product_id", "is required")
        elif not isinstance(value, str) or not UUID_RE.match(value.strip().lower()):
            self.problem(f"{where}.cws_product_id", f"must be a CWS product id (UUID), got {_show(value)}")
        else:
            return value.strip().lower()
        return None

    def g2a_id(self, fields, where):
        value = fields.get("g2a_product_id")
        if value is None:
            self.problem(f"{where}.g2a_product_id", "is required")
            return None
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            self.problem(f"{where}.g2a_product_id", f"must be a positive integer, got {_show(value)}")
            return None
        return value

    def money(self, fields, key, where, default):
        return self.bounded(fields, key, where, default, lambda n: n >= 0, "a number ≥ 0")

    def fee(self, fields, key, where, default):
        return self.bounded(fields, key, where, default, lambda n: 0 <= n < 1, "a fraction in [0, 1)")

    def bounded(self, fields, key, where, default, fits, wanted):
        """The field as a Decimal (`default` when absent or null); a non-number or out-of-range value is a problem."""
        value = fields.get(key)
        if value is None:
            return default
        number = _number(value)
        if number is None or not fits(number):
            self.problem(f"{where}.{key}", f"must be {wanted}, got {_show(value)}")
            return default
        return number

    def count(self, fields, key, where):
        value = fields.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.problem(f"{where}.{key}", f"must be a whole number ≥ 0, got {_show(value)}")
            return None
        return value

    def flag(self, fields, key, where):
        value = fields.get(key, True)
        if not isinstance(value, bool):
            self.problem(f"{where}.{key}", f"must be true or false, got {_show(value)}")
            return True
        return value

    def duplicates(self, mappings):
        seen = {}
        for i, mapping in enumerate(mappings):
            if mapping is None or mapping.g2a_product_id is None:
                continue
            first = seen.setdefault(mapping.g2a_product_id, i)
            if first != i:
                self.problem(f"products[{i}].g2a_product_id",
                             f"{mapping.g2a_product_id} is already mapped by products[{first}]")


def _number(value):
    """A finite Decimal from a JSON number or numeric text, else None (true/false are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, Decimal, str)):
        return None
    try:
        number = Decimal(value.strip() if isinstance(value, str) else value)
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _reject_constant(name):
    raise ValueError(f"{name} is not a number")


def _show(value):
    """A value as the operator wrote it in JSON: "abc", 1.5, true, null."""
    if isinstance(value, Decimal):
        return str(value)
    return json.dumps(value, default=str, ensure_ascii=False)


def apply_mapping(mappings):
    """Store the mapping in one transaction: upsert Product rows, unmap the ones missing from the file."""
    wanted = {m.g2a_product_id: _row(m) for m in mappings}
    with db.write_transaction():
        _ensure_cws_products({m.cws_product_id for m in mappings})
        current = {g2a_id: stored for g2a_id, *stored in db.Product.select(*_COLUMNS).tuples().iterator()}
        added = [row for g2a_id, row in wanted.items() if g2a_id not in current]
        changed = [row for g2a_id, row in wanted.items() if g2a_id in current and _differs(current[g2a_id], row)]
        removed = [g2a_id for g2a_id, stored in current.items() if stored[_MAPPED] and g2a_id not in wanted]
        for start in range(0, len(added), CHUNK):
            db.Product.insert_many(added[start:start + CHUNK]).execute()
        for row in changed:
            db.Product.update(**_fields_only(row)).where(db.Product.g2a_id == row["g2a_id"]).execute()
        for start in range(0, len(removed), CHUNK):
            db.Product.update(mapped=False).where(db.Product.g2a_id.in_(removed[start:start + CHUNK])).execute()
    return {"added": len(added), "updated": len(changed), "removed": len(removed)}


_FIELDS = ("cws_product", "mapped", "enabled", "fixed_profit", "fee", "min_price", "max_price", "max_stock")
_COLUMNS = [db.Product.g2a_id] + [getattr(db.Product, name) for name in _FIELDS]
_MAPPED = _FIELDS.index("mapped")


def _row(mapping):
    return {"g2a_id": mapping.g2a_product_id, "cws_product": mapping.cws_product_id, "mapped": True,
            "enabled": mapping.enabled, "fixed_profit": mapping.fixed_profit, "fee": mapping.fee,
            "min_price": mapping.min_price, "max_price": mapping.max_price, "max_stock": mapping.max_stock}


def _differs(stored, wanted):
    return any(value != wanted[name] for name, value in zip(_FIELDS, stored))


def _fields_only(row):
    return {name: row[name] for name in _FIELDS}


def _ensure_cws_products(ids):
    """A CwsProduct row for each id (sync fills it in); only the new ones are inserted."""
    table = db.CwsProduct._meta.table
    known = {cws_id for (cws_id,) in table.select(table.id).tuples().iterator()}
    rows = [{"id": cws_id} for cws_id in sorted(set(ids) - known)]
    for start in range(0, len(rows), CHUNK):
        db.CwsProduct.insert_many(rows[start:start + CHUNK]).on_conflict_ignore().execute()


class MappingWatcher:
    """Reloads products.json when its mtime or size changes; a bad file is refused and the old mapping stays."""

    def __init__(self, path, default_profit, default_fee):
        self.path = Path(path)
        self.default_profit, self.default_fee = default_profit, default_fee
        self._seen = None
        self.problems = []

    def poll(self):
        """True when a new mapping was applied."""
        signature = self._signature()
        if signature == self._seen:
            return False
        self._seen = signature
        try:
            mappings = load_mapping(self.path, self.default_profit, self.default_fee)
        except ConfigError as exc:
            self.problems = exc.problems
            event(log, "products.refused", level=logging.ERROR, file=str(self.path),
                  problems="; ".join(exc.problems), remedy="the previous mapping stays in force")
            db.put_setting(REFUSED_KEY, json.dumps({"file": str(self.path), "problems": exc.problems}))
            return False
        self.problems = []
        db.Setting.delete().where(db.Setting.key == REFUSED_KEY).execute()
        counts = apply_mapping(mappings)
        event(log, "products.loaded", file=str(self.path), products=len(mappings), **counts)
        return True

    def _signature(self):
        try:
            stat = self.path.stat()
        except OSError:
            return ("missing",)
        return (stat.st_mtime_ns, stat.st_size)
