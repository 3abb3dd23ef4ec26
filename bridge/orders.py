"""Reading orders: find one by any id G2A uses, render its inventory, and describe orders for the CLI.

Read-only and CWS-free, so GET /order/{id}/inventory is safe to call any number of times.
"""
from itertools import groupby

from . import db
from .contract import INT64_MAX, stock_entry
from .errors import BridgeError, ContractError
from .keys import ACCOUNT, DELIVERED, FILE, order_items
from .stock import available_stock


def find_order(any_id):
    """The order for our order id, G2A's order id or the reservation id; None when none matches."""
    order = db.Order.get_or_none(db.Order.id == any_id)
    if order is None and any_id.isdigit() and 0 < int(any_id) <= INT64_MAX:
        order = db.Order.get_or_none(db.Order.g2a_order_id == int(any_id))
    if order is None:
        order = db.Order.get_or_none(db.Order.reservation == any_id)
    return order


def resolve(any_id):
    order = find_order(any_id)
    if order is None:
        raise ContractError(404, "BR02", f"order {any_id} not found")
    return order


def items_of(order):
    return order_items(order.id)


def inventory(order, key_store, now):
    """GET /order/{id}/inventory: the order's stock lines, or 500 ERR99 once it has failed (an admin may retry)."""
    if order.state == db.FAILED:
        raise ContractError(500, "ERR99", f"order {order.id} could not be fulfilled ({order.failure}); "
                                          "the seller has been alerted and can retry it")
    return stock_lines(order, key_store, now)


def stock_lines(order, key_store, now):
    """The `stock` array: keys only once every key is there (all or nothing), never a returned one."""
    items = items_of(order)
    sizes = inventory_sizes({item.g2a_product_id for item in items}, now)
    ready = order.state == db.COMPLETED
    return [stock_entry(product_id, sizes.get(product_id, 0),
                        [key_store.inventory_line(item) for item in group if ready and item.state == DELIVERED])
            for product_id, group in groupby(items, key=lambda item: item.g2a_product_id)]


def inventory_sizes(g2a_ids, now):
    """{g2a_product_id: keys G2A may still sell}: zero when disabled, capped by max_stock."""
    g2a_ids = list(g2a_ids)
    products = db.raw_rows(db.Product, f"SELECT * FROM product WHERE g2a_id IN ({', '.join(['{p}'] * len(g2a_ids))})",
                           *g2a_ids) if g2a_ids else []
    available = available_stock([product.cws_product_id for product in products], now)
    sizes = {}
    for product in products:
        size = available.get(product.cws_product_id, 0) if product.enabled else 0
        sizes[product.g2a_id] = size if product.max_stock is None else min(size, product.max_stock)
    return sizes


def item_of(order, item_id, kind):
    """A delivered item of `kind` in the order, else 404 (G2A asks the file/account endpoint for its own kind)."""
    item = db.OrderItem.get_or_none(db.OrderItem.id == item_id, db.OrderItem.order == order.id)
    if item is None or item.kind != kind or item.state != DELIVERED or order.state != db.COMPLETED:
        raise ContractError(404, "BR02", f"order {order.id} has no delivered {kind} item {item_id}")
    return item


def file_item(order, item_id):
    return item_of(order, item_id, FILE)


def account_item(order, item_id):
    return item_of(order, item_id, ACCOUNT)


# ---- for the CLI ---------------------------------------------------------------------------------

def summary(order):
    return {"id": order.id, "g2a_order_id": order.g2a_order_id, "state": order.state,
            "created_at": order.created_at.isoformat(), "cws_order_id": order.cws_order_id,
            "failure": order.failure}


def describe(any_id, key_store, reveal=False):
    """Everything about one order (keys masked unless reveal); BridgeError if there is none."""
    order = find_order(any_id)
    if order is None:
        raise BridgeError(f"order {any_id} not found (give our order id, the G2A order id or the reservation id)")
    times = {name: _iso(getattr(order, name)) for name in ("updated_at", "placed_at", "completed_at", "next_check_at")}
    return summary(order) | times | {
        "reservation_id": order.reservation_id, "cws_client_order_id": order.cws_client_order_id,
        "request_id": order.request_id, "checks": order.check_count,
        "sale_total": _text(order.sale_total), "cost_total": _text(order.cost_total),
        "items": [_item(item, key_store, reveal) for item in items_of(order)]}


def list_orders(state=None, limit=20):
    """Newest orders first, optionally only those in `state`."""
    if state is not None and state not in db.ORDER_STATES:
        raise BridgeError(f"unknown state {state!r}; one of {', '.join(db.ORDER_STATES)}")
    query = db.Order.select().order_by(db.Order.created_at.desc()).limit(limit)
    if state is not None:
        query = query.where(db.Order.state == state)
    return [summary(order) for order in query]


def _item(item, key_store, reveal):
    return {"id": item.id, "position": item.position, "g2a_product_id": item.g2a_product_id,
            "cws_product_id": item.cws_product_id, "source": item.source, "kind": item.kind, "state": item.state,
            "key": key_store.masked(item, reveal), "unit_cost": _text(item.unit_cost),
            "delivered_at": _iso(item.delivered_at), "returned_at": _iso(item.returned_at)}


def _iso(moment):
    return None if moment is None else moment.isoformat()


def _text(amount):
    return None if amount is None else str(amount)
