"""CWS postbacks (cws.md 4): check the authHash, then only mark what to re-fetch; the payload's numbers are never trusted."""
import hashlib
import hmac
import logging

from . import db
from .contract import parse_json
from .errors import ContractError
from .log import event

log = logging.getLogger(__name__)


def handle(settings, body, now):
    """Act on one postback body (bytes, str or parsed JSON); returns the HTTP status to answer (200)."""
    payload = _parse(body)
    _verify(settings, payload)
    kind = str(payload.get("type") or "").upper()
    action = ACTIONS.get(kind)
    if action is None:
        event(log, "postback.ignored", type=kind or "missing")
        return 200
    action(payload, now)
    return 200


def _parse(body):
    if isinstance(body, (bytes, bytearray, str)):
        try:
            body = parse_json(body)
        except ContractError:
            raise ContractError(400, "BR01", "postback body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ContractError(400, "BR01", "postback body must be a JSON object")
    return body


def expected_hash(client_id, signature):
    """sha256(client id + client signature) as lowercase hex, as the official CWS SDK computes it."""
    return hashlib.sha256((client_id + signature).encode("utf-8")).hexdigest()


def _verify(settings, payload):
    given = payload.get("authHash")
    if not settings.cws_client_signature or not isinstance(given, str) or not given:
        # With no configured signature nothing can be verified, so every postback is refused.
        event(log, "postback.refused", level=logging.WARNING, reason="unsigned or no CWS_CLIENT_SIGNATURE set")
        raise ContractError(401, "AUTH01" if not given else "AUTH02", "postback signature invalid")
    wanted = expected_hash(settings.cws_client_id, settings.cws_client_signature)
    if not hmac.compare_digest(given.strip().lower().encode(), wanted.encode()):
        event(log, "postback.refused", level=logging.WARNING, reason="wrong authHash")
        raise ContractError(401, "AUTH02", "postback signature invalid")


def _product_ids(payload):
    """productIds from either STOCK shape: products[{productId}] or a flat productId."""
    entries = payload.get("products") if isinstance(payload.get("products"), list) else [payload]
    ids = (entry.get("productId") for entry in entries if isinstance(entry, dict))
    return sorted({pid.strip().lower() for pid in ids if _usable(pid)})


def _usable(value):
    """A non-empty string id; one with NUL cannot be CWS's (and PostgreSQL refuses it even in a lookup)."""
    return isinstance(value, str) and bool(value.strip()) and "\x00" not in value


def _mark_dirty(payload, now):
    ids = _product_ids(payload)
    if ids:
        # The newest mark wins, so a sync pass that read the product before this postback leaves it dirty.
        marked = db.CwsProduct.update(dirty_since=now).where(db.CwsProduct.id.in_(ids)).execute()
        event(log, "postback.dirty", type=payload.get("type"), products=",".join(ids), known=marked)
    return ids


def _preorder(payload, now):
    """A pre-ordered key was assigned: make fulfilment poll the order now (by CWS order id, or by code id)."""
    order_id, code_id = payload.get("orderId"), payload.get("codeId")
    query = db.Order.update(next_check_at=now)
    if _usable(order_id):
        query = query.where(db.Order.cws_order_id == order_id)
    elif _usable(code_id):  # the id of a pre-order placeholder we stored, or of a code already delivered
        query = query.where(db.Order.id.in_(db.OrderItem.select(db.OrderItem.order).where(
            (db.OrderItem.preorder_code_id == code_id) | (db.OrderItem.cws_code_id == code_id))))
    else:
        event(log, "postback.ignored", level=logging.WARNING, type="PREORDER", reason="no orderId or codeId")
        return
    event(log, "postback.preorder", cws_order=order_id, code_id=code_id, orders=query.execute())


# PRODUCT_HIDDEN too only marks: the authHash is the same for every postback, so a captured one could be replayed
# forever; CWS's own answer to the re-read is what takes a product off sale.
ACTIONS = {"STOCK": _mark_dirty, "PRODUCT_UPDATED": _mark_dirty, "PRODUCT_HIDDEN": _mark_dirty, "PREORDER": _preorder}
