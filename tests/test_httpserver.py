"""The web's Waitress settings that are not Waitress options (bridge/httpserver.py); keep-alive after a 204 is tested
over HTTP in test_healthcheck.py."""
import sys

import pytest

from bridge import httpserver


class StubServer:
    """What serve() needs of Waitress's server, doing nothing."""

    def print_listen(self, text):
        pass

    def run(self):
        pass


@pytest.fixture
def switch_interval():
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


def test_the_web_hands_the_gil_over_sooner_than_pythons_default(switch_interval, monkeypatch):
    monkeypatch.setattr(httpserver.waitress, "create_server", lambda app, **options: StubServer())
    sys.setswitchinterval(0.005)
    httpserver.serve(lambda environ, start_response: [])
    assert sys.getswitchinterval() == pytest.approx(httpserver.SWITCH_INTERVAL) and httpserver.SWITCH_INTERVAL < 0.005
