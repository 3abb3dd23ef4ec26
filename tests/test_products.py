"""products.json: every accepted shape, every field error named, stored and hot-reloaded safely."""
import json
import logging
import os
from decimal import Decimal as D

import pytest

from bridge import db
from bridge.errors import ConfigError
from bridge.migrations import open_database
from bridge.products import Mapping, MappingWatcher, apply_mapping, load_mapping

A = "466c805b-ead1-4851-bc4f-9eda242550ad"
B = "067ccfe1-655a-4a1f-8362-c655bb9bbf95"
C = "c08e582f-edef-4936-86eb-2b1775711557"


@pytest.fixture
def database(tmp_path):
    database = open_database(f"sqlite:///{tmp_path}/bridge.db")
    yield database
    database.close()


def write(tmp_path, data, name="products.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def load(tmp_path, data):
    return load_mapping(write(tmp_path, data), D("0.50"), D("0.15"))


def problems(tmp_path, data):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, data)
    return info.value.problems


def test_the_documented_example_loads_with_defaults_and_overrides(tmp_path):
    text = """{"defaults": {"fixed_profit": 0.40, "fee_percentage": 0.10},
      "products": [
        {"cws_product_id": "%s", "g2a_product_id": 10000068865001},
        {"cws_product_id": "%s", "g2a_product_id": 10000068865002,
         "fixed_profit": 1.20, "min_price": 3.50, "max_price": 40.00, "max_stock": 20, "enabled": true}]}""" % (A, B)
    first, second = load(tmp_path, text)
    assert first == Mapping(A, 10000068865001, D("0.40"), D("0.10"))
    assert second == Mapping(B, 10000068865002, D("1.20"), D("0.10"), D("3.50"), D("40.00"), 20, True)


def test_a_bare_array_with_camel_case_keys_uses_the_env_defaults(tmp_path):
    (mapping,) = load(tmp_path, [{"cwsProductId": A.upper(), "g2aProductId": "10000068865001",
                                  "maxStock": 3, "feePercentage": "0.2"}])
    assert mapping == Mapping(A, 10000068865001, D("0.50"), D("0.2"), max_stock=3)


def test_numbers_never_pass_through_float(tmp_path):
    (mapping,) = load(tmp_path, '[{"cws_product_id": "%s", "g2a_product_id": 1, "fixed_profit": 0.1}]' % A)
    assert mapping.fixed_profit == D("0.1")


@pytest.mark.parametrize("field, value, message", [
    ("max_price", "abc", 'products[0].max_price: must be a number ≥ 0, got "abc"'),
    ("min_price", -1, "products[0].min_price: must be a number ≥ 0, got -1"),
    ("fixed_profit", True, "products[0].fixed_profit: must be a number ≥ 0, got true"),
    ("fee_percentage", 1, "products[0].fee_percentage: must be a fraction in [0, 1), got 1"),
    ("fee_percentage", "x", 'products[0].fee_percentage: must be a fraction in [0, 1), got "x"'),
    ("max_stock", 2.5, "products[0].max_stock: must be a whole number ≥ 0, got 2.5"),
    ("max_stock", -3, "products[0].max_stock: must be a whole number ≥ 0, got -3"),
    ("enabled", "yes", 'products[0].enabled: must be true or false, got "yes"'),
    ("g2a_product_id", "12ab", 'products[0].g2a_product_id: must be a positive integer, got "12ab"'),
    ("g2a_product_id", 0, "products[0].g2a_product_id: must be a positive integer, got 0"),
    ("cws_product_id", "nope", 'products[0].cws_product_id: must be a CWS product id (UUID), got "nope"'),
    ("max_prcie", 3, "products[0]: unknown field 'max_prcie'"),
])
def test_each_bad_field_is_named_with_its_entry(tmp_path, field, value, message):
    entry = {"cws_product_id": A, "g2a_product_id": 1, field: value}
    assert problems(tmp_path, [entry]) == [f"products.json: {message}"]


def test_missing_ids_are_required(tmp_path):
    assert problems(tmp_path, [{}]) == ["products.json: products[0].cws_product_id: is required",
                                        "products.json: products[0].g2a_product_id: is required"]


def test_every_problem_is_listed_at_once(tmp_path):
    found = problems(tmp_path, {"defaults": {"fixed_profit": "x"}, "products": [
        {"cws_product_id": A, "g2a_product_id": 1, "max_stock": "lots"}, "oops",
        {"cws_product_id": B, "g2a_product_id": 2, "min_price": 9, "max_price": 3}]})
    assert found == ['products.json: defaults.fixed_profit: must be a number ≥ 0, got "x"',
                     'products.json: products[0].max_stock: must be a whole number ≥ 0, got "lots"',
                     'products.json: products[1]: must be an object, got "oops"',
                     "products.json: products[2].min_price: 9 is above max_price 3"]


def test_a_g2a_product_mapped_twice_is_an_error(tmp_path):
    found = problems(tmp_path, [{"cws_product_id": A, "g2a_product_id": 7},
                                {"cws_product_id": B, "g2a_product_id": "7"}])
    assert found == ["products.json: products[1].g2a_product_id: 7 is already mapped by products[0]"]


def test_one_cws_product_may_feed_two_g2a_products(tmp_path):
    assert len(load(tmp_path, [{"cws_product_id": A, "g2a_product_id": 1},
                               {"cws_product_id": A, "g2a_product_id": 2}])) == 2


@pytest.mark.parametrize("text, message", [
    ("{not json", "products.json: not valid JSON"),
    ('{"products": {}}', "products.json: products: must be an array of products, got {}"),
    ('"hello"', 'products.json: must be an object with "products" or an array of products'),
    ('[{"cws_product_id": "%s", "g2a_product_id": 1, "max_price": NaN}]' % A, "products.json: not valid JSON"),
    ('{"products": [], "defaults": [], "extra": 1}', "products.json: top level: unknown field 'extra'"),
])
def test_a_malformed_file_is_refused(tmp_path, text, message):
    assert problems(tmp_path, text)[0].startswith(message)


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_mapping(tmp_path / "absent.json", D("0.5"), D("0.15"))


def test_notes_may_be_added_to_entries(tmp_path):
    assert len(load(tmp_path, [{"cws_product_id": A, "g2a_product_id": 1, "name": "Cities", "_x": 1}])) == 1


def test_apply_inserts_updates_and_unmaps_without_deleting(database):
    first = [Mapping(A, 1, D("0.5"), D("0.15")), Mapping(B, 2, D("0.5"), D("0.15"))]
    assert apply_mapping(first) == {"added": 2, "updated": 0, "removed": 0}
    assert apply_mapping(first) == {"added": 0, "updated": 0, "removed": 0}
    second = [Mapping(A, 1, D("0.7"), D("0.15"), max_stock=4), Mapping(C, 3, D("0.5"), D("0.15"))]
    assert apply_mapping(second) == {"added": 1, "updated": 1, "removed": 1}
    rows = {p.g2a_id: p for p in db.Product.select()}
    assert (rows[1].fixed_profit, rows[1].max_stock, rows[1].mapped) == (D("0.7"), 4, True)
    assert rows[2].mapped is False
    assert rows[3].cws_product_id == C
    assert db.CwsProduct.select().count() == 3
    assert apply_mapping(first) == {"added": 0, "updated": 2, "removed": 1}
    assert db.Product.get_by_id(2).mapped is True


def test_the_watcher_reloads_on_change_and_keeps_the_old_mapping_on_a_bad_file(database, tmp_path, caplog):
    path = write(tmp_path, [{"cws_product_id": A, "g2a_product_id": 1}])
    watcher = MappingWatcher(path, D("0.5"), D("0.15"))
    assert watcher.poll() is True
    assert watcher.poll() is False
    write(tmp_path, [{"cws_product_id": A, "g2a_product_id": 1, "max_price": "abc"}])
    with caplog.at_level(logging.ERROR):
        assert watcher.poll() is False
        assert watcher.poll() is False
    refusals = [r for r in caplog.records if r.getMessage() == "products.refused"]
    assert len(refusals) == 1
    assert "products[0].max_price" in refusals[0].event_fields["problems"]
    assert db.Product.get_by_id(1).mapped is True
    write(tmp_path, [{"cws_product_id": B, "g2a_product_id": 2, "max_stock": 1}])
    os.utime(path, ns=(1, 1))
    assert watcher.poll() is True
    assert db.Product.get_by_id(1).mapped is False
    assert db.Product.get_by_id(2).max_stock == 1


def test_the_watcher_refuses_a_missing_file_once(database, tmp_path, caplog):
    watcher = MappingWatcher(tmp_path / "absent.json", D("0.5"), D("0.15"))
    with caplog.at_level(logging.ERROR):
        assert watcher.poll() is False
        assert watcher.poll() is False
    assert [r.getMessage() for r in caplog.records] == ["products.refused"]
