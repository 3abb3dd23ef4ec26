"""Upstream budgets: sliding windows per endpoint class, the split between processes, AIMD after a 429,
Retry-After, and one alert for a persistent throttle."""
import pytest

from bridge.budget import (BACKOFF_CAP, PERSISTENT, ROLES, SPLIT, UNMETERED, Budget, allot, budgets_for, limits)
from bridge.config import Settings
from fakes import FakeClock

CLASSES = ("cws_token", "cws_list", "cws_product", "cws_other", "g2a")


def budget(limit=10, window=60.0, clock=None, alarm=None):
    clock = clock or FakeClock(1000.0)
    return Budget("cws_product", limit, window, clock=clock, sleep=clock.sleep, alarm=alarm), clock


# --- the sliding window -------------------------------------------------------------------

def test_a_budget_lets_its_limit_through_then_waits_for_the_oldest_to_leave_the_window():
    spent, clock = budget(limit=3, window=60)
    for _ in range(3):
        assert spent.acquire()
        clock.now += 10
    assert spent.acquire()  # the first left the window at t=60
    assert clock.now == 1060.0
    assert spent.window_use() == (3, 3)


def test_no_window_of_the_budgets_length_ever_holds_more_than_its_limit():
    spent, clock = budget(limit=5, window=30)
    times = []
    for _ in range(40):
        spent.acquire()
        times.append(clock.now)
        clock.now += 0.7
    assert max(sum(1 for t in times if start <= t < start + 30) for start in times) == 5


def test_try_acquire_never_waits():
    spent, clock = budget(limit=2)
    assert spent.try_acquire() and spent.try_acquire()
    assert not spent.try_acquire()
    assert clock.slept == []


def test_acquire_gives_up_when_no_slot_frees_up_within_its_timeout():
    spent, clock = budget(limit=1, window=60)
    spent.acquire()
    assert not spent.acquire(timeout=30)
    assert spent.acquire(timeout=61)


def test_an_unmetered_class_is_counted_but_never_held_back():
    free = Budget(UNMETERED, None)
    for _ in range(1000):
        assert free.try_acquire()
    assert free.window_use() == (1000, None) and free.per_second is None


def test_per_second_is_the_pace_of_the_slice():
    assert budget(limit=30, window=60)[0].per_second == 0.5


# --- the split between processes ----------------------------------------------------------

@pytest.mark.parametrize("share", [0.9, 0.5, 1.0, 0.33])
@pytest.mark.parametrize("scale", [1, 7, 0.5])
def test_web_worker_and_cli_together_never_exceed_the_share_of_any_limit(share, scale):
    settings = Settings(upstream_budget_share=share, cws_list_per_10_min=round(400 * scale),
                        cws_product_per_5_min=round(600 * scale), cws_token_per_5_min=round(50 * scale),
                        g2a_requests_per_minute=round(600 * scale))
    for name, limit in limits(settings).items():
        combined = sum(budgets_for(settings, role)[name].limit for role in ROLES)
        assert combined <= share * limit.per_window, name


def test_the_default_split_follows_what_each_process_calls():
    web, worker, cli = (budgets_for(Settings(), role) for role in ROLES)
    assert (web["cws_list"].limit, worker["cws_list"].limit, cli["cws_list"].limit) == (0, 324, 36)
    assert (web["cws_product"].limit, worker["cws_product"].limit, cli["cws_product"].limit) == (243, 243, 54)
    assert (web["g2a"].limit, worker["g2a"].limit) == (0, 486)
    assert (web["cws_token"].limit, worker["cws_token"].limit, cli["cws_token"].limit) == (18, 18, 9)


def test_every_split_row_sums_to_one():
    assert all(abs(sum(row.values()) - 1) < 1e-9 and set(row) == set(ROLES) for row in SPLIT.values())
    assert set(SPLIT) == set(CLASSES)


def test_a_tiny_limit_still_leaves_each_process_with_a_slice_one_request():
    assert allot(2.7, {"web": 0.4, "worker": 0.4, "cli": 0.2}) == {"web": 1, "worker": 1, "cli": 1}
    assert allot(45, {"web": 0.0, "worker": 0.9, "cli": 0.1}) == {"web": 0, "worker": 41, "cli": 4}


def test_an_unknown_role_is_refused():
    with pytest.raises(ValueError):
        budgets_for(Settings(), "admin")


# --- 429: Retry-After, backoff, AIMD --------------------------------------------------------

def test_a_429_holds_the_class_for_its_retry_after():
    spent, clock = budget(limit=100)
    assert spent.throttled(retry_after=12) == 12
    assert not spent.try_acquire()
    spent.acquire()
    assert clock.now == 1012.0


@pytest.mark.parametrize("absurd", [-5, 86400, 601])
def test_an_absurd_retry_after_is_ignored_for_the_backoff(absurd):
    spent, _ = budget()
    assert spent.throttled(retry_after=absurd) == 0.25


def test_without_retry_after_the_hold_doubles_per_429_in_a_row_up_to_a_cap_and_resets_after_an_answer():
    spent, _ = budget()
    holds = [spent.throttled() for _ in range(8)]
    holds += [spent.throttled() for _ in range(3)]
    assert holds == [0.25, 0.5, 1, 2, 4, 8, 16, 32, BACKOFF_CAP, BACKOFF_CAP, BACKOFF_CAP]
    spent.answered()
    assert spent.throttled() == 0.25


def test_a_429_halves_the_pace_and_the_pace_comes_back_linearly_over_half_a_window():
    spent, clock = budget(limit=100, window=100)
    spent.throttled(retry_after=0)
    assert spent.per_second == 0.5
    spent.throttled(retry_after=0)
    assert spent.per_second == 0.25
    clock.now += 25
    assert spent.per_second == 0.5
    clock.now += 50
    assert spent.per_second == 1.0
    clock.now += 1000
    assert spent.per_second == 1.0


def test_429s_that_arrive_together_slow_the_class_down_once():
    spent, clock = budget(limit=100, window=100)
    for _ in range(8):  # eight writer threads answered 429 at once
        spent.throttled(retry_after=5)
    assert spent.per_second == 0.5 and spent.throttles == 8


def test_a_slowed_class_lets_fewer_requests_into_its_window():
    spent, clock = budget(limit=10, window=100)
    spent.throttled(retry_after=0)
    assert sum(spent.try_acquire() for _ in range(10)) == 5


def test_the_pace_never_drops_below_a_tenth_and_never_below_one_request():
    spent, _ = budget(limit=100, window=100)
    for _ in range(20):
        spent.throttled(retry_after=0)
    assert spent.per_second == 0.1
    lone, _ = budget(limit=1, window=10)
    lone.throttled(retry_after=0)
    assert lone.per_second == 0.1


def test_429s_are_counted():
    spent, _ = budget()
    spent.throttled(1)
    spent.throttled(1)
    assert spent.throttles == 2 and spent.throttling


# --- persistent throttle ------------------------------------------------------------------

def test_a_class_throttled_for_minutes_alerts_once_naming_the_class_and_its_budget():
    clock, raised = FakeClock(1000.0), []
    settings = Settings(cws_list_per_10_min=400, upstream_budget_share=0.9)
    budgets = budgets_for(settings, "worker", clock=clock, sleep=clock.sleep,
                          alarm=lambda name, text: raised.append((name, text)))
    for _ in range(12):
        budgets["cws_list"].throttled(retry_after=30)
        clock.now += 30
    assert len(raised) == 1
    name, text = raised[0]
    assert name == "cws_list"
    assert text == ("CWS GET /v3/products answered 429 for 5 min; budget 360/600 s \N{EM DASH} "
                    "lower CWS_LIST_REQUESTS_PER_10_MIN")
    assert budgets.throttling() == ["cws_list"]


def test_a_few_429s_with_answers_in_between_never_alert():
    raised = []
    spent, clock = budget(alarm=lambda *args: raised.append(args))
    for _ in range(30):
        spent.throttled(retry_after=1)
        clock.now += PERSISTENT / 10
        spent.answered()
    assert raised == [] and not spent.throttling


def test_a_new_streak_after_an_answer_may_alert_again():
    raised = []
    spent, clock = budget(alarm=lambda *args: raised.append(args))
    for _ in range(2):
        spent.throttled(1)
        clock.now += PERSISTENT
        spent.throttled(1)
        spent.answered()
    assert len(raised) == 2


def test_an_alarm_that_fails_does_not_break_the_request():
    def broken(*args):
        raise RuntimeError("database is locked")
    spent, clock = budget(alarm=broken)
    spent.throttled(1)
    clock.now += PERSISTENT
    assert spent.throttled(1) == 1
