"""The brake on failed authentication: a flood of new addresses cannot free a braked one, the table stays bounded,
IPv6 counts per /64 (one customer's whole block), and failed CWS postbacks count too."""
import pytest
import requests

from bridge.auth import FailureBrake
from bridge.errors import ContractError
from fakes import FakeClock


def braked(brake, ip):
    try:
        brake.check(ip)
    except ContractError as err:
        assert (err.status, err.code) == (429, "AUTH03")
        return True
    return False


def fail(brake, ip, times=1):
    for _ in range(times):
        brake.check(ip)
        brake.failed(ip)


def test_a_flood_of_10001_new_addresses_does_not_free_a_braked_one():
    brake = FailureBrake(clock=FakeClock(1000.0))
    fail(brake, "203.0.113.7", 20)
    assert braked(brake, "203.0.113.7")
    for n in range(10_001):
        fail(brake, f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
    assert braked(brake, "203.0.113.7")
    assert brake.size() <= 10_000


def test_when_the_table_is_full_the_oldest_unbraked_addresses_go_first():
    clock = FakeClock(1000.0)
    brake = FailureBrake(clock=clock, capacity=100)
    fail(brake, "198.51.100.1", 19)  # one short of the brake, and the oldest
    clock.now += 1
    for n in range(100):
        fail(brake, f"10.0.0.{n}")
    fail(brake, "198.51.100.1")
    assert not braked(brake, "198.51.100.1")  # its 19 failures were forgotten, not counted to 20
    assert brake.size() <= 100


def test_a_full_table_of_braked_addresses_stays_bounded_and_keeps_the_newest_brakes():
    clock = FakeClock(1000.0)
    brake = FailureBrake(clock=clock, capacity=10)
    for n in range(15):
        fail(brake, f"10.0.0.{n}", 20)
        clock.now += 0.1
    assert brake.size() <= 10
    assert braked(brake, "10.0.0.14")


def test_successful_calls_from_new_addresses_leave_no_entry():
    brake = FailureBrake(clock=FakeClock(1000.0))
    for n in range(1000):
        brake.check(f"10.0.{n >> 8}.{n & 255}")
    assert brake.size() == 0


def test_ipv6_addresses_count_per_64_block():
    brake = FailureBrake(clock=FakeClock(1000.0))
    for n in range(20):
        fail(brake, f"2001:db8:1:2::{n + 1:x}")
    assert braked(brake, "2001:db8:1:2:ffff:ffff:ffff:ffff")
    assert not braked(brake, "2001:db8:1:3::1")


def test_an_ipv4_mapped_ipv6_address_counts_as_its_ipv4_address():
    brake = FailureBrake(clock=FakeClock(1000.0))
    fail(brake, "::ffff:203.0.113.9", 20)
    assert braked(brake, "203.0.113.9")
    assert not braked(brake, "203.0.113.10")


def test_the_brake_lets_an_address_go_when_its_window_has_passed():
    clock = FakeClock(1000.0)
    brake = FailureBrake(clock=clock)
    fail(brake, "203.0.113.7", 20)
    clock.now += 61
    assert not braked(brake, "203.0.113.7")


def test_failed_postbacks_are_braked_per_address(web, sim):
    url, forwarded = f"{web.base_url}/cws/postback", {"X-Forwarded-For": "203.0.113.66"}
    statuses = [requests.post(url, json=sim.cws.postback("STOCK", valid=False, productId="x"), headers=forwarded,
                              timeout=10).status_code for _ in range(21)]
    assert statuses == [401] * 20 + [429]
    good = sim.cws.postback("STOCK", productId="x")
    assert requests.post(url, json=good, headers=forwarded, timeout=10).status_code == 429
    assert requests.post(url, json=good, headers={"X-Forwarded-For": "203.0.113.67"}, timeout=10).status_code == 200
