"""Slow clients against the real web process: connections that trickle a request body in must not stop G2A's calls,
and the systemd unit gives the process the file descriptors its connection limit needs."""
import configparser
import re
import socket
import threading
import time
from pathlib import Path

import requests
from conftest import OUR_ID, OUR_SECRET, SWITCH

from bridge import web

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "g2a-bridge-web.service"
README = Path(__file__).resolve().parent.parent / "README.md"
SLOW_CONNECTIONS = 150


class Trickle:
    """Connections that each announce a body and then send it one byte every `every` seconds, on one thread."""

    def __init__(self, port, count, every=2.0):
        self.sockets, self.every, self.stop = [], every, threading.Event()
        head = (f"POST /reservation HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: 10000\r\n\r\n[").encode()
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(head)
            self.sockets.append(sock)
        self.thread = threading.Thread(target=self._drip, daemon=True)
        self.thread.start()

    def _drip(self):
        while not self.stop.wait(self.every):
            for sock in self.sockets:
                try:
                    sock.sendall(b" ")
                except OSError:
                    pass

    def still_open(self):
        """How many of the trickling connections the server has not closed (a closed one reads EOF)."""
        open_ = 0
        for sock in self.sockets:
            sock.setblocking(False)
            try:
                open_ += sock.recv(1) != b""
            except BlockingIOError:
                open_ += 1
            except OSError:
                pass
        return open_

    def close(self):
        self.stop.set()
        self.thread.join()
        for sock in self.sockets:
            sock.close()


def timed(call):
    started = time.monotonic()
    answer = call()
    return answer, time.monotonic() - started


def test_g2a_calls_answer_within_2_s_while_150_connections_trickle_request_bodies_in(web):
    port = int(web.base_url.rsplit(":", 1)[1])
    trickle = Trickle(port, SLOW_CONNECTIONS)
    try:
        time.sleep(0.5)  # let the server accept them all
        token, took_token = timed(lambda: requests.get(f"{web.base_url}/oauth/token", timeout=2, params={
            "grant_type": "client_credentials", "client_id": OUR_ID, "client_secret": OUR_SECRET}))
        assert token.status_code == 200 and took_token < 2
        headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
        reserved, took_reservation = timed(lambda: requests.post(
            f"{web.base_url}/reservation", json=[{"product_id": SWITCH, "quantity": 1}], headers=headers, timeout=2))
        assert reserved.status_code == 200 and took_reservation < 2
        assert trickle.still_open() == SLOW_CONNECTIONS  # they were served alongside, not dropped to make room
    finally:
        trickle.close()


def test_the_server_accepts_far_more_connections_than_waitress_default_and_closes_idle_ones():
    assert web.SERVER_OPTIONS["connection_limit"] >= 1000
    assert web.SERVER_OPTIONS["asyncore_use_poll"] is True  # select() cannot watch descriptors past 1023
    assert web.SERVER_OPTIONS["channel_timeout"] <= 30
    assert web.SERVER_OPTIONS["cleanup_interval"] <= 5


def test_the_readme_proxies_buffer_and_cap_bodies_and_drop_idle_connections_before_the_bridge_does():
    proxy = README.read_text().split("## TLS reverse proxy", 1)[1].split("\n## ", 1)[0]
    caddy, nginx = re.findall(r"```(?:nginx)?\n(.*?)```", proxy, re.S)[:2]
    assert "max_size 1MB" in caddy and "request_buffers 1MB" in caddy
    (keepalive,) = re.findall(r"keepalive (\d+)s", caddy)
    assert int(keepalive) < web.SERVER_OPTIONS["channel_timeout"]
    assert "client_max_body_size 1m;" in nginx and "proxy_request_buffering on;" in nginx
    assert "proxy_http_version" not in nginx  # HTTP/1.0 upstream: no idle connection to race with


def test_the_web_unit_allows_enough_file_descriptors_for_the_connection_limit():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(UNIT)
    limit = int(unit["Service"]["LimitNOFILE"])
    # One descriptor per connection, plus the database, the outbound HTTPS pools and the listening socket.
    assert limit >= 2 * web.SERVER_OPTIONS["connection_limit"]
