"""Ids from the pooled os.urandom: version-4 UUIDs, unique across threads, one system call per pool, and a forked
child never repeats its parent's next id."""
import os
import threading
import uuid

from bridge import ids


def test_ids_are_version_4_uuids_and_16_hex_digit_request_ids():
    made = [ids.new_uuid() for _ in range(1000)]
    assert len(set(made)) == 1000
    for text in made:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122
    request_id = ids.new_request_id()
    assert len(request_id) == 16 and int(request_id, 16) >= 0


def test_one_system_call_fills_the_pool_for_many_ids(monkeypatch):
    calls = []

    def urandom(count):
        calls.append(count)
        return bytes(range(256)) * (count // 256)
    monkeypatch.setattr(ids.os, "urandom", urandom)
    monkeypatch.setattr(ids, "_pool", ids._Pool())  # a pool of its own: the fake bytes never reach another test
    per_pool = ids.POOL_BYTES // 16
    first = [ids.new_uuid() for _ in range(per_pool)]
    assert calls == [ids.POOL_BYTES]
    ids.new_uuid()
    assert calls == [ids.POOL_BYTES] * 2 and len(first) == per_pool


def test_threads_never_get_the_same_id():
    made = []

    def make():
        made.extend(ids.new_uuid() for _ in range(2000))
    threads = [threading.Thread(target=make) for _ in range(8)]
    [thread.start() for thread in threads]
    [thread.join(30) for thread in threads]
    assert len(made) == len(set(made)) == 16000


def test_a_forked_child_does_not_hand_out_its_parents_next_id():
    ids.new_uuid()  # the pool is filled before the fork
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(writer, ids.new_uuid().encode())
        os._exit(0)
    os.close(writer)
    in_child = os.read(reader, 64).decode()
    os.waitpid(child, 0)
    os.close(reader)
    assert uuid.UUID(in_child).version == 4 and in_child != ids.new_uuid()
