"""Game keys at rest: CWS codes sealed onto order items, items opened for G2A, returned keys pooled for reuse.

Every value is encrypted with the KeyBox and fingerprinted. Nothing here talks to CWS or logs a key.
"""
import base64
import binascii
import json
import logging
import mimetypes
import re
from dataclasses import dataclass
from itertools import groupby

from . import db
from .errors import ContractError
from .log import event

log = logging.getLogger(__name__)
TEXT, FILE, ACCOUNT = "text", "file", "account"
PENDING, DELIVERED, RETURNED = "pending", "delivered", "returned"
# Sniffed first: CWS file names are sometimes missing or say .png for a JPEG.
MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
         (b"%PDF", "application/pdf"))
ACCOUNT_FIELDS = ("username", "password", "email", "emailPassword")


@dataclass(frozen=True)
class Sealed:
    """One key ready to store: its kind, the encrypted value and the fingerprint of the plain value."""
    kind: str
    secret: str
    fingerprint: str
    file_name: str | None = None
    mime_type: str | None = None


class KeyStore:
    def __init__(self, key_box):
        self.box = key_box

    # ---- sealing ------------------------------------------------------------------------------

    def seal_text(self, value):
        return Sealed(TEXT, self.box.encrypt(value), self.box.fingerprint(value))

    def seal_file(self, data, file_name=""):
        mime_type = sniff_mime(data, file_name)
        name = file_name or "key" + (mimetypes.guess_extension(mime_type) or "")
        return Sealed(FILE, self.box.encrypt(data), self.box.fingerprint(data), name, mime_type)

    def seal_account(self, fields):
        """An account key (kind "account"); CWS never sells these today, G2A's contract has them."""
        value = json.dumps({name: fields.get(name, "") for name in ACCOUNT_FIELDS}
                           | {"optional": fields.get("optional", [])}, sort_keys=True)
        return Sealed(ACCOUNT, self.box.encrypt(value), self.box.fingerprint(value))

    def seal_codes(self, codes, game_name):
        """One item's key from one CWS code, or a random-key bundle from several (text only), or None if unreadable."""
        if len(codes) > 1:
            return self.seal_text(bundle(game_name, [code.value for code in codes]))
        code = codes[0]
        if code.kind != "image":
            return self.seal_text(code.value)
        try:
            return self.seal_file(base64.b64decode(code.value, validate=True), code.filename)
        except (binascii.Error, ValueError):
            event(log, "order.bad_image_code", level=logging.WARNING, code=code.code_id)
            return None

    # ---- storing CWS codes --------------------------------------------------------------------

    def store(self, order_id, codes, names, now):
        """Put the codes of a completed CWS order ({cws_product_id: [CwsCode]}, all of them in CWS's order:
        placeholders and codes without a value included) on the order's waiting items. A unit whose codes
        are not all there yet keeps waiting, and remembers its placeholder's code id (PREORDER postbacks
        name only that).

        Idempotent: a code already on an item is skipped (and cws_code_id is unique). Returns True when
        every item of the order has its key."""
        with db.write_transaction():
            items = order_items(order_id)
            for product_id, product_codes in codes.items():
                mine = [item for item in items if item.cws_product_id == product_id and item.source == "cws"]
                for item, group in assignments(mine, product_codes):
                    self._store_group(item, group, names.get(product_id, ""), now)
            return all(item.state != PENDING for item in items)

    def _store_group(self, item, group, game_name, now):
        if not all(code.value for code in group):
            if item.preorder_code_id != group[0].code_id:
                db.OrderItem.update(preorder_code_id=group[0].code_id).where(db.OrderItem.id == item.id).execute()
            return
        sealed = self.seal_codes(group, game_name)
        if sealed:
            deliver(item, sealed, now, cws_code_id=group[0].code_id)

    # ---- the pool of returned keys --------------------------------------------------------------

    @staticmethod
    def fill_from_pool(items, now):
        """Inside the claim transaction: give items returned keys of their CWS product, oldest first; how many."""
        used = 0
        db.lock_rows(db.CwsProduct, sorted({item.cws_product_id for item in items}))  # one pool taker per product
        for product_id, group in groupby(sorted(items, key=lambda i: (i.cws_product_id, i.position)),
                                         key=lambda i: i.cws_product_id):
            group = list(group)
            pooled = db.raw_rows(db.PooledKey, "SELECT * FROM pooled_key WHERE cws_product_id = {p} "
                                 "AND taken_by_id IS NULL ORDER BY id LIMIT {p}", product_id, len(group))
            for item, key in zip(group, pooled):
                taken_from(item, key.returned_item, now)
                db.PooledKey.update(taken_by=item.id).where(db.PooledKey.id == key.id).execute()
                used += 1
        return used

    @staticmethod
    def release_pool_keys(order_id):
        """Inside a transaction: an order that will not be delivered gives its pooled keys back (G2A never saw
        them); its items wait again, to be bought or pooled anew if the order is retried. How many."""
        items = [item.id for item in db.OrderItem.select(db.OrderItem.id).where(
            db.OrderItem.order == order_id, db.OrderItem.source == "pool")]
        if not items:
            return 0
        db.PooledKey.update(taken_by=None).where(db.PooledKey.taken_by.in_(items)).execute()
        db.OrderItem.update(source="cws", state=PENDING, kind=TEXT, secret=None, fingerprint=None, file_name=None,
                            mime_type=None, delivered_at=None).where(db.OrderItem.id.in_(items)).execute()
        return len(items)

    @staticmethod
    def return_items(order, item_ids, now):
        """G2A refunded these items: mark them returned and pool their keys. Returning twice is harmless."""
        wanted = list(dict.fromkeys(item_ids))
        if not wanted:
            raise ContractError(400, "BR02", "give the items to return as id[]=ITEM_ID")
        with db.write_transaction():
            items = {item.id: item for item in db.OrderItem.select().where(
                db.OrderItem.order == order.id, db.OrderItem.id.in_(wanted))}
            unknown = [item_id for item_id in wanted if item_id not in items]
            if unknown:
                raise ContractError(404, "BR02", f"order {order.id} has no item {', '.join(unknown)}")
            waiting = [item.id for item in items.values() if item.state == PENDING]
            if waiting:
                raise ContractError(400, "BR02", f"item {', '.join(waiting)} has no key yet; nothing to return")
            fresh = [item for item in items.values() if item.state == DELIVERED]
            if fresh:
                db.OrderItem.update(state=RETURNED, returned_at=now).where(
                    db.OrderItem.id.in_([item.id for item in fresh])).execute()
                db.PooledKey.insert_many([{"cws_product_id": item.cws_product_id, "returned_item": item.id,
                                           "created_at": now} for item in fresh]).execute()
        event(log, "order.returned", order=order.id, items=len(fresh), again=len(wanted) - len(fresh))
        return len(fresh)

    # ---- opening keys for G2A and the operator -----------------------------------------------

    def inventory_line(self, item):
        """{"id","value","kind"}: text keys carry their value, files and accounts are fetched by id."""
        value = self.box.decrypt_text(item.secret) if item.kind == TEXT else ""
        return {"id": item.id, "value": value, "kind": item.kind}

    def file_payload(self, item):
        return {"data": base64.b64encode(self.box.decrypt(item.secret)).decode("ascii"),
                "fileName": item.file_name or "key", "mimeType": item.mime_type or "application/octet-stream"}

    def account_payload(self, item):
        fields = json.loads(self.box.decrypt_text(item.secret))
        return {name: fields.get(name, "") for name in ACCOUNT_FIELDS} | {"optional": fields.get("optional", [])}

    def masked(self, item, reveal=False):
        """What the CLI shows for an item's key: masked like ABCD-****-****-WXYZ unless reveal."""
        if item.secret is None:
            return ""
        if item.kind == FILE:
            return f"<file {item.file_name}, {item.mime_type}>"
        value = self.box.decrypt_text(item.secret)
        if item.kind == ACCOUNT:
            return value if reveal else "<account " + mask(json.loads(value).get("username", "")) + ">"
        return value if reveal else mask(value)


def assignments(items, codes):
    """(item, [codes]) pairs for the items still waiting, in order. `codes` is the complete code list of one
    product in one CWS order, so the units it covers (waiting items, and those holding one of its codes) decide
    the bundle size once for all: codes that arrive in steps never make half-bundles. When the list is a whole
    multiple of those units and holds no image, each unit gets that many codes (a random-key bundle)."""
    ids = {code.code_id for code in codes}
    stored = {item.cws_code_id for item in items if item.cws_code_id in ids}
    waiting = [item for item in items if item.state == PENDING]
    per_item = bundle_size(len(waiting) + len(stored), codes)
    groups = [codes[start:start + per_item] for start in range(0, len(codes), per_item)]
    return list(zip(waiting, [group for group in groups if group[0].code_id not in stored]))


def bundle_size(units, codes):
    if units and len(codes) > units and len(codes) % units == 0 and all(code.kind != "image" for code in codes):
        return len(codes) // units
    return 1


def bundle(game_name, values):
    """G2A's random-key bundle format (2025-07-01): `Game name | KEY / Game name | KEY`."""
    return " / ".join(f"{game_name} | {value}" for value in values)


def order_items(order_id):
    """The items of an order by position. Hand-written, like the other statements of POST /order (claims.py)."""
    return db.raw_rows(db.OrderItem, "SELECT * FROM order_item WHERE order_id = {p} ORDER BY position", order_id)


def deliver(item, sealed, now, **fields):
    """`fields`: more order_item columns to set (cws_code_id, source)."""
    values = {"kind": sealed.kind, "secret": sealed.secret, "fingerprint": sealed.fingerprint,
              "file_name": sealed.file_name, "mime_type": sealed.mime_type, "state": DELIVERED,
              "delivered_at": db.OrderItem.delivered_at.db_value(now), **fields}
    columns = ", ".join(f"{name} = {{p}}" for name in values)
    db.run_sql(f"UPDATE order_item SET {columns} WHERE id = {{p}}", *values.values(), item.id)
    item.state = DELIVERED


def taken_from(item, returned, now):
    """A pooled key moves to a new item: same encrypted value, the new item's own id."""
    deliver(item, Sealed(returned.kind, returned.secret, returned.fingerprint, returned.file_name,
                         returned.mime_type), now, source="pool")
    item.source = "pool"


def sniff_mime(data, file_name=""):
    for magic, mime_type in MAGIC:
        if data.startswith(magic):
            return mime_type
    return mimetypes.guess_type(file_name)[0] or "application/octet-stream"


def mask(value):
    """ABCD-EFGH-IJKL-WXYZ -> ABCD-****-****-WXYZ; short values are masked whole."""
    if len(value) <= 8:
        return "*" * len(value)
    return value[:4] + re.sub(r"[^-\s|/]", "*", value[4:-4]) + value[-4:]
