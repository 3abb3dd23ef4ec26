"""CWS postbacks: only signed ones count, and they only mark what to re-fetch; the dirty pass then acts fast."""
import json
import uuid
from datetime import datetime, timezone
from decimal import Decimal as D

import pytest

from bridge import db
from bridge.config import Settings
from bridge.cws import CwsClient
from bridge.errors import ContractError
from bridge.g2a import G2aClient
from bridge.migrations import open_database
from bridge.pause import PauseSwitch
from bridge.postbacks import expected_hash, handle
from bridge.products import Mapping, apply_mapping
from bridge.sim import (CWS_CLIENT_ID, CWS_CLIENT_SECRET, CWS_CLIENT_SIGNATURE, G2A_API_KEY,
                              G2A_API_SECRET, Simulator)
from bridge.sync import SyncEngine

NOW = datetime(2025, 7, 14, 12, 0, tzinfo=timezone.utc)
SETTINGS = Settings(cws_client_id=CWS_CLIENT_ID, cws_client_signature=CWS_CLIENT_SIGNATURE)
AUTH_HASH = expected_hash(CWS_CLIENT_ID, CWS_CLIENT_SIGNATURE)
A, B = "466c805b-ead1-4851-bc4f-9eda242550ad", "067ccfe1-655a-4a1f-8362-c655bb9bbf95"


@pytest.fixture
def database(tmp_path):
    database = open_database(f"sqlite:///{tmp_path}/bridge.db")
    apply_mapping([Mapping(A, 1, D("0.5"), D("0.15")), Mapping(B, 2, D("0.5"), D("0.15"))])
    yield database
    database.close()


def post(payload, settings=SETTINGS):
    return handle(settings, json.dumps(payload).encode(), NOW)


def dirty():
    return {p.id: p.dirty_since for p in db.CwsProduct.select()}


def refusal(payload, settings=SETTINGS):
    with pytest.raises(ContractError) as info:
        post(payload, settings)
    return info.value.status, info.value.code


def test_the_auth_hash_matches_the_cws_test_vector():
    assert AUTH_HASH == "4e2bb084b493d93216f55bac33f3987bc25c1d9bf8167677faed92fc9cdcb6d2"


def test_a_signed_stock_postback_marks_its_products_dirty(database):
    payload = {"type": "STOCK", "authHash": AUTH_HASH,
               "products": [{"productId": A, "quantity": 999, "prices": [{"priceRangeLabel": "1-9", "price": 0.01}]},
                            {"productId": str(uuid.uuid4()), "quantity": 1}]}
    assert post(payload) == 200
    assert dirty() == {A: NOW, B: None}
    assert db.CwsProduct.get_by_id(A).quantity == 0  # the payload's numbers are never trusted


def test_the_flat_stock_shape_is_accepted_too(database):
    assert post({"type": "STOCK", "authHash": AUTH_HASH, "productId": B.upper(), "quantity": 3}) == 200
    assert dirty() == {A: None, B: NOW}


def test_a_product_update_marks_it_dirty(database):
    post({"type": "PRODUCT_UPDATED", "authHash": AUTH_HASH, "productId": A})
    assert dirty()[A] == NOW


def test_a_hidden_product_postback_only_marks_the_product_to_re_read(database):
    """The authHash never changes, so a captured PRODUCT_HIDDEN could be replayed forever: it must not delist."""
    db.CwsProduct.update(quantity=8).execute()
    post({"type": "PRODUCT_HIDDEN", "authHash": AUTH_HASH, "productId": A})
    product = db.CwsProduct.get_by_id(A)
    assert (product.listed, product.quantity, product.dirty_since) == (True, 8, NOW)


def make_order(cws_order_id=None):
    reservation = db.Reservation.create(id=str(uuid.uuid4()), expires_at=NOW)
    order = db.Order.create(id=str(uuid.uuid4()), reservation=reservation, g2a_order_id=uuid.uuid4().int % 10**12,
                            state=db.PREORDER, cws_client_order_id=str(uuid.uuid4()), cws_order_id=cws_order_id)
    db.OrderItem.create(id=str(uuid.uuid4()), order=order, position=0, g2a_product_id=1, cws_product_id=A,
                        cws_code_id=f"code-{order.id}")
    return order


def test_a_preorder_postback_makes_fulfilment_check_the_order_now(database):
    wanted, other = make_order("cws-1"), make_order("cws-2")
    post({"type": "PREORDER", "authHash": AUTH_HASH, "orderId": "cws-1"})
    assert db.Order.get_by_id(wanted.id).next_check_at == NOW
    assert db.Order.get_by_id(other.id).next_check_at is None


def test_a_legacy_preorder_postback_finds_the_order_by_code(database):
    order = make_order()
    post({"type": "PREORDER", "authHash": AUTH_HASH, "codeId": f"code-{order.id}"})
    assert db.Order.get_by_id(order.id).next_check_at == NOW


@pytest.mark.parametrize("kind", ["NEW_PRODUCT", "NEW_FULL_PRODUCT", "SOMETHING_ELSE", None])
def test_other_types_are_accepted_and_ignored(database, kind):
    assert post({"type": kind, "authHash": AUTH_HASH, "productId": A}) == 200
    assert dirty()[A] is None


def test_a_wrong_hash_is_401(database):
    assert refusal({"type": "STOCK", "authHash": "0" * 64, "productId": A}) == (401, "AUTH02")
    assert dirty()[A] is None


def test_an_unsigned_postback_is_401(database):
    assert refusal({"type": "STOCK", "productId": A}) == (401, "AUTH01")


def test_without_a_configured_signature_every_postback_is_refused(database):
    assert refusal({"type": "STOCK", "authHash": AUTH_HASH}, SETTINGS.replace(cws_client_signature="")) == \
        (401, "AUTH02")


@pytest.mark.parametrize("body", [b"{nope", b"[1, 2]", b"", "\"text\""])
def test_a_malformed_body_is_400(database, body):
    with pytest.raises(ContractError) as info:
        handle(SETTINGS, body, NOW)
    assert (info.value.status, info.value.code) == (400, "BR01")


def test_a_parsed_body_is_accepted(database):
    assert handle(SETTINGS, {"type": "STOCK", "authHash": AUTH_HASH, "productId": A}, NOW) == 200


def test_a_stock_postback_reaches_the_g2a_offer_through_the_dirty_pass(tmp_path):
    with Simulator() as sim:
        open_database(f"sqlite:///{tmp_path}/bridge.db")
        sim.cws.add_product(A, 5, [(1, None, "5.00")])
        sim.cws.add_product(B, 5, [(1, None, "5.00")])
        sim.g2a.add_offer(1, "6.48", 5, active=True)
        sim.g2a.add_offer(2, "6.48", 5, active=True)
        apply_mapping([Mapping(A, 1, D("0.5"), D("0.15")), Mapping(B, 2, D("0.5"), D("0.15"))])
        settings = SETTINGS.replace(cws_client_secret=CWS_CLIENT_SECRET, cws_base_url=sim.cws_url,
                                    g2a_api_key=G2A_API_KEY, g2a_api_secret=G2A_API_SECRET, g2a_base_url=sim.g2a_url)
        g2a = G2aClient(settings, job_poll_interval=0.005)
        engine = SyncEngine(settings, CwsClient(settings), g2a, PauseSwitch(max_age=0))
        engine.full_pass()
        sim.cws.set_quantity(A, 1)
        sim.cws.set_quantity(B, 2)
        assert handle(settings, sim.cws.postback("STOCK", products=[sim.cws.stock_entry(A)]), db.utcnow()) == 200
        report = engine.dirty_pass()
        assert [p["body"]["variant"] for p in sim.g2a.patches] == [{"inventory": {"size": 1}}]
        assert report.writes == 1
        with pytest.raises(ContractError):
            handle(settings, sim.cws.postback("STOCK", valid=False, productId=B), db.utcnow())
        assert engine.dirty_pass() is None


def test_replayed_hidden_postbacks_leave_a_product_cws_still_sells_on_sale_and_cws_confirming_takes_it_off(tmp_path):
    with Simulator() as sim:
        open_database(f"sqlite:///{tmp_path}/bridge.db")
        sim.cws.add_product(A, 5, [(1, None, "5.00")])
        sim.g2a.add_offer(1, "6.48", 5, active=True)
        apply_mapping([Mapping(A, 1, D("0.5"), D("0.15"))])
        settings = SETTINGS.replace(cws_client_secret=CWS_CLIENT_SECRET, cws_base_url=sim.cws_url,
                                    g2a_api_key=G2A_API_KEY, g2a_api_secret=G2A_API_SECRET, g2a_base_url=sim.g2a_url)
        engine = SyncEngine(settings, CwsClient(settings), G2aClient(settings, job_poll_interval=0.005),
                            PauseSwitch(max_age=0))
        engine.full_pass()
        hidden = sim.cws.postback("PRODUCT_HIDDEN", productId=A)
        for _ in range(3):
            assert handle(settings, hidden, db.utcnow()) == 200
            engine.dirty_pass()
        assert sim.g2a.patches == [] and sim.g2a.offer_for_product("1")["active"]
        assert (db.CwsProduct.get_by_id(A).listed, db.CwsProduct.get_by_id(A).quantity) == (True, 5)
        sim.cws.remove_product(A)
        assert handle(settings, hidden, db.utcnow()) == 200
        engine.dirty_pass()
        assert not sim.g2a.offer_for_product("1")["active"]
