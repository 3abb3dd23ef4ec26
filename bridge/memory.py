"""Giving the C heap's free pages back to the system (glibc's `malloc_trim`).

glibc keeps the memory a burst freed inside its heap, and gives back only what sits at the very top. In the worker,
short bursts (a CWS page being stored, a pass's G2A writes, order polling) meet on many threads, so over hours the
resident size creeps towards the largest such meeting ever seen, not what the process uses. A trim every half
minute (the worker's memory.trim job) returns every whole free page of every arena. The worker unit sets
PYTHONMALLOC=malloc so that Python's objects are in those arenas too: Python's own allocator gives a 1 MiB arena
back only once every object in it is gone. Elsewhere than glibc (musl, macOS) there is no such call and nothing is
done.
"""
import ctypes


def _malloc_trim():
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own C library; ctypes lets go of the GIL during it
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def give_back():
    """Return the C heap's whole free pages to the system; False where the C library has no malloc_trim."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
