"""`g2a-bridge report`: the money of a seeded set of orders, checked cent for cent against a hand computation,
on SQLite and PostgreSQL, and the command as an operator runs it."""
import itertools
import json
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from test_cli import run_cli

from bridge import db, metrics, migrations, report
from bridge.config import Settings

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)
GAME, INDIE, OLD = 10000068865001, 10000068865002, 10000068865003
G2A_ORDER_IDS = itertools.count(80201000000001)
SETTINGS = Settings(default_fee=Decimal("0.15"), currency="EUR")


def seed_product(g2a_id, fee):
    cws = db.CwsProduct.create(id=f"cws-{g2a_id}", name=f"Game {g2a_id % 100}", quantity=10)
    db.Product.create(g2a_id=g2a_id, cws_product=cws, fee=fee)


def seed_order(created, state, items):
    """An order with `items`: (g2a product, item state, source, sale price, unit cost)."""
    reservation = db.Reservation.create(id=str(uuid.uuid4()), state="ordered", expires_at=created)
    g2a_order_id = next(G2A_ORDER_IDS)
    order = db.Order.create(id=str(uuid.uuid4()), reservation=reservation, g2a_order_id=g2a_order_id,
                            state=state, cws_client_order_id=f"g2a-{g2a_order_id}", created_at=created)
    for position, (g2a_id, item_state, source, sale, cost) in enumerate(items):
        db.OrderItem.create(id=str(uuid.uuid4()), order=order, position=position, g2a_product_id=g2a_id,
                            cws_product_id=f"cws-{g2a_id}", source=source, state=item_state,
                            sale_price=sale and Decimal(sale), unit_cost=cost and Decimal(cost),
                            delivered_at=created if item_state in ("delivered", "returned") else None)
    return order


def seed_shop():
    """Five kinds of order over two days, plus one before the period (left out of every figure)."""
    seed_product(GAME, Decimal("0.15"))
    seed_product(INDIE, Decimal("0.10"))
    seed_product(OLD, Decimal("0.15"))
    day1, day2 = NOW - timedelta(days=2), NOW - timedelta(hours=3)
    seed_order(day1, "completed", [(GAME, "delivered", "cws", "10.00", "7.50"),   # instant, two keys
                                   (GAME, "delivered", "cws", "10.00", "7.50")])
    seed_order(day1, "completed", [(INDIE, "returned", "cws", "4.99", "3.10")])   # returned to the pool
    seed_order(day2, "completed", [(INDIE, "delivered", "pool", "4.99", None)])    # the pooled key reused
    seed_order(day2, "completed", [(INDIE, "delivered", "cws", "3.33", "3.40")])   # a loss-maker
    seed_order(day2, "fulfilling", [(GAME, "pending", "cws", "10.00", "7.50")])    # delayed: paid, no key yet
    seed_order(day2, "failed", [(GAME, "pending", "cws", "10.00", None)])           # CWS refused: nothing charged
    seed_order(NOW - timedelta(days=9), "completed", [(OLD, "delivered", "cws", "99.00", "1.00")])


# By hand: revenue counts keys delivered and not returned; the fee is the product's fee_percentage of that
# revenue per day and product, rounded half up to the cent; the cost is what CWS charged (keys bought).
GAME_REVENUE, GAME_FEE, GAME_COST = Decimal("20.00"), Decimal("3.00"), Decimal("22.50")  # 7.50 x 3 keys bought
# INDIE day 1: revenue 0 (returned), fee 0, cost 3.10; day 2: revenue 4.99 + 3.33 = 8.32, fee 0.832 -> 0.83,
# cost 3.40.
INDIE_REVENUE, INDIE_FEE, INDIE_COST = Decimal("8.32"), Decimal("0.83"), Decimal("6.50")


@pytest.fixture(params=["sqlite", "postgresql"])
def shop(request, tmp_path):
    url = f"sqlite:///{tmp_path}/report.db" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    database = migrations.open_database(url)
    seed_shop()
    yield url
    database.close()


def test_the_report_matches_a_hand_computation_cent_for_cent(shop):
    sales = report.build(SETTINGS, NOW - timedelta(days=7), NOW)
    game, indie = sales.rows
    assert (game.key, game.orders, game.keys, game.revenue, game.fee, game.cost, game.profit) == (
        str(GAME), 3, 2, GAME_REVENUE, GAME_FEE, GAME_COST, Decimal("-5.50"))
    assert (indie.key, indie.orders, indie.keys, indie.revenue, indie.fee, indie.cost, indie.profit) == (
        str(INDIE), 3, 3, INDIE_REVENUE, INDIE_FEE, INDIE_COST, Decimal("0.99"))
    assert (indie.returned, indie.reused) == (1, 1)
    assert (game.name, indie.name) == ("Game 1", "Game 2")
    total = sales.total
    assert (total.orders, total.keys, total.revenue, total.fee, total.cost, total.profit) == (
        6, 5, Decimal("28.32"), Decimal("3.83"), Decimal("29.00"), Decimal("-4.51"))
    assert total.margin == Decimal("-15.9")
    assert (sales.failed, sales.stuck) == (1, 1)


def test_per_day_rows_add_up_to_the_same_total(shop):
    sales = report.build(SETTINGS, NOW - timedelta(days=7), NOW, by="day")
    day1, day2 = sales.rows
    assert (day1.key, day1.revenue, day1.fee, day1.cost) == (
        str((NOW - timedelta(days=2)).date()), Decimal("20.00"), Decimal("3.00"), Decimal("18.10"))
    assert (day2.revenue, day2.fee, day2.cost) == (Decimal("8.32"), Decimal("0.83"), Decimal("10.90"))
    assert sales.total.profit == Decimal("-4.51")


def test_a_shorter_period_leaves_the_older_orders_out(shop):
    sales = report.build(SETTINGS, report.parse_since("24h", NOW), NOW)
    assert sales.total.orders == 4 and sales.total.revenue == Decimal("8.32")


def test_the_json_marks_loss_makers_and_ranks_products_by_profit(shop):
    body = report.as_json(report.build(SETTINGS, NOW - timedelta(days=30), NOW))
    assert body["loss_makers"] == [str(GAME)]
    assert [line["key"] for line in body["best"]] == [str(OLD), str(INDIE), str(GAME)]
    assert body["total"]["revenue"] == "127.32" and body["currency"] == "EUR"


def test_the_text_and_csv_say_the_same_figures(shop):
    sales = report.build(SETTINGS, NOW - timedelta(days=7), NOW)
    text = report.as_text(sales)
    assert "revenue 28.32  G2A fee 3.83  CWS cost 29.00  profit -4.51  margin -15.9%" in text
    assert f"{GAME}" in text and "LOSS" in text
    rows = report.as_csv(sales).splitlines()
    assert rows[0] == "product,name,orders,keys,revenue,fee,cost,profit,margin,returned,reused"
    assert rows[-1] == "total,,6,5,28.32,3.83,29.00,-4.51,-15.9,1,1"


@pytest.mark.parametrize("since, expected", [
    ("24h", NOW - timedelta(hours=24)), ("7d", NOW - timedelta(days=7)), ("30D", NOW - timedelta(days=30)),
    ("2026-11-01", datetime(2026, 11, 1, tzinfo=timezone.utc))])
def test_since_takes_hours_days_or_a_date(since, expected):
    assert report.parse_since(since, NOW) == expected


def test_the_command_prints_json_and_refuses_a_bad_since_with_exit_2(bridge_env, fresh_db):
    ok = run_cli(bridge_env, "report", "--json", "--since", "30d")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["total"]["orders"] == 0
    bad = run_cli(bridge_env, "report", "--since", "last week")
    assert bad.returncode == 2 and "24h, 7d, 30d or YYYY-MM-DD" in bad.stderr and "Traceback" not in bad.stderr


def test_metrics_export_the_all_time_money_and_the_pooled_keys(shop):
    db.PooledKey.create(cws_product_id=f"cws-{INDIE}", returned_item=db.OrderItem.get(db.OrderItem.state == "returned"))
    families = {family.name: family.samples for family in metrics.money_families(SETTINGS)}
    values = {name.removeprefix("g2a_bridge_"): samples[0].value for name, samples in families.items()}
    assert values == {"revenue": 127.32, "g2a_fee": 18.68, "cws_cost": 30.0, "profit": 78.64, "pooled_keys": 1}
