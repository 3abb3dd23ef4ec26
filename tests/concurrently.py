"""Running calls at the same time in threads, for races the tests provoke on purpose."""
import threading


def run_together(*calls):
    """Start every call in its own thread, then wait for all of them."""
    threads = [threading.Thread(target=call) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
