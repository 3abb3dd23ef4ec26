"""Waitress as the web process runs it, with two changes.

A connection stays open after an answer without a body: Waitress closes the connection after every 204 under HTTP/1.1
(it wants a Content-Length, which a 204 must not carry), so each G2A /healthcheck probe, a 204, would cost a new TCP
connection.

A thread waiting for the GIL asks for it after 1 ms instead of Python's 5: the thread that writes a batch of
reservations holds the writer lock while it waits to get the GIL back from SQLite, and every queued reservation
waits with it (docs/decisions.md, round 9).
"""
import sys

import waitress
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer
from waitress.task import WSGITask


SWITCH_INTERVAL = 0.001  # seconds; sys.setswitchinterval's default is 0.005


class _Task(WSGITask):
    _building_header = False

    def build_response_header(self):
        self._building_header = True
        try:
            return super().build_response_header()
        finally:
            self._building_header = False

    def set_close_on_finish(self):
        # Only the header builder's "no Content-Length, so close" is skipped, and only where no body can follow.
        if self._building_header and not self.has_body and self.version == "1.1" \
                and self.request.headers.get("CONNECTION", "").lower() != "close":
            return
        super().set_close_on_finish()


class _Channel(HTTPChannel):
    task_class = _Task


def serve(app, **options):
    """waitress.serve(app, **options) with keep-alive after 204/304 and the shorter GIL switch interval; runs until
    the process is stopped."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    sockets = {}
    server = waitress.create_server(app, map=sockets, **options)
    for listener in list(sockets.values()):
        if isinstance(listener, BaseWSGIServer):
            listener.channel_class = _Channel
    server.print_listen("Serving on http://{}:{}")
    server.run()
