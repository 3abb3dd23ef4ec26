"""Giving the C heap's free pages back (memory.py)."""
import sys

import pytest

from bridge import memory

PAGE = 4096


def resident_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc are Linux's")
def test_free_pages_in_the_middle_of_the_heap_go_back_to_the_system():
    # 16 KiB blocks come from glibc's heap (under its mmap threshold); keeping every 8th one, the last included,
    # leaves ~56 MB free between live blocks, which glibc alone never returns (only the heap's top is trimmed).
    blocks = [bytes(16 * 1024) for _ in range(4096)]
    kept = blocks[7::8]
    del blocks
    before = resident_bytes()
    assert memory.give_back() is True
    assert before - resident_bytes() > 20_000_000
    assert len(kept) == 512


def test_without_malloc_trim_nothing_is_done(monkeypatch):
    monkeypatch.setattr(memory, "_TRIM", None)
    assert memory.give_back() is False


@pytest.mark.parametrize("library", [OSError("no C library to open"), object()])  # unopenable; no malloc_trim
def test_a_c_library_without_malloc_trim_gives_no_trim(monkeypatch, library):
    def cdll(name):
        if isinstance(library, Exception):
            raise library
        return library
    monkeypatch.setattr(memory.ctypes, "CDLL", cdll)
    assert memory._malloc_trim() is None
