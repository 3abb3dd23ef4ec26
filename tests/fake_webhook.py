"""A Slack-like incoming webhook on loopback that records every JSON body posted to it."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class FakeWebhook:
    """`posts` holds the bodies received; `answers` (statuses) are used up one per post, then 200."""

    def __init__(self):
        self.posts, self.answers = [], []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T000/B000/secret-path"

    def _handler(self):
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hook.posts.append(json.loads(body))
                self.send_response(hook.answers.pop(0) if hook.answers else 200)
                self.end_headers()

            def log_message(self, *args):
                pass
        return Handler

    def texts(self):
        return [post["text"] for post in self.posts]

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    """A FakeWebhook for one test (loopback http is allowed by config); import this fixture where needed."""
    with FakeWebhook() as hook:
        yield hook
