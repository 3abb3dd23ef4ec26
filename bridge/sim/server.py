"""HTTP plumbing shared by the simulator's two fakes: routing, fault knobs, a threaded loopback server.

A fake subclasses FakeApi and lists its routes; serve() puts it on a ThreadingHTTPServer.
"""
import base64
import binascii
import collections
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from decimal import Decimal
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("bridge.sim")
CONTROL_PREFIX = "/_sim/"
GARBAGE = b'{"items": [{"productId": '


class HttpError(Exception):
    """Raised by a route to answer `status` with the JSON `body`."""

    def __init__(self, status, body):
        super().__init__(status)
        self.status, self.body = status, body


class BadRequest(Exception):
    """Raised by a route for a malformed request; the fake renders it in its own error shape."""


@dataclass
class Reply:
    status: int | None = 200  # None closes the connection without an answer
    body: object = None  # dict/list (JSON), bytes (sent as is) or None (empty)
    hang: float = 0.0  # seconds to wait, outside the fake's lock, before answering
    headers: dict = field(default_factory=dict)  # extra response headers (Retry-After)


@dataclass
class Request:
    method: str
    path: str
    query: dict  # first value of each query parameter
    headers: object  # case-insensitive mapping (email.message.Message)
    body: bytes
    params: dict = field(default_factory=dict)  # values of {placeholders} in the route template

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            raise BadRequest("body is not valid JSON") from None

    def form(self):
        return _first_values(parse_qs(self.body.decode("utf-8", "replace")))

    def basic_auth(self):
        """(user, password) from an HTTP Basic header, or None."""
        scheme, _, value = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return (user, password) if sep else None

    def bearer(self):
        scheme, _, value = (self.headers.get("Authorization") or "").partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None


def to_json(value):
    """JSON bytes; Decimal becomes a JSON number (6.32), as CWS sends prices."""
    return json.dumps(value, default=_json_default, separators=(",", ":")).encode()


def _json_default(value):
    if isinstance(value, Decimal):
        return float(value)  # money is quantized to cents, so the shortest float repr is exact
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _phrase(status):
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def _first_values(multi):
    return {key: values[0] for key, values in multi.items()}


@dataclass
class Route:
    method: str
    template: str
    handler: object
    public: bool = False  # no token needed
    pattern: re.Pattern = None

    def __post_init__(self):
        regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(self.template))
        self.pattern = re.compile(regex)


class FakeApi:
    """Base of a fake API: route table, request counter, queued faults, latency, a state lock."""

    hang_seconds = 30.0
    fault_names = frozenset({"timeout", "garbage", "empty"})  # besides HTTP statuses (ints)

    def __init__(self):
        self.delay = 0.0
        self.requests = collections.Counter()
        self.base_url = ""
        self._faults = []  # [(path prefix, deque of outcomes)]
        self._lock = threading.RLock()
        self._halt = threading.Event()
        self._routes = self.routes()

    def routes(self):
        """The fake's Route list."""
        raise NotImplementedError

    def error_body(self, status, message):
        """The fake's error body for a generic failure."""
        raise NotImplementedError

    def authenticate(self, request):
        """Raise HttpError unless the request carries a valid token."""
        raise NotImplementedError

    def fail_next(self, path_prefix, *outcomes):
        """Queue faults for the next requests whose path starts with path_prefix, one per request."""
        unknown = [fault for fault in outcomes if not isinstance(fault, int) and fault not in self.fault_names]
        if unknown:
            raise ValueError(f"unknown fault outcomes {unknown}; use HTTP statuses or {sorted(self.fault_names)}")
        with self._lock:
            self._faults.append((path_prefix, collections.deque(outcomes)))

    def pause(self, seconds):
        """Sleep that ends early when the simulator stops, so tests shut down at once."""
        if seconds > 0:
            self._halt.wait(seconds)

    def halt(self):
        self._halt.set()

    def resume(self):
        self._halt.clear()

    def link(self, path):
        return {"rel": "self", "href": f"{self.base_url}{path}"}

    def fault_reply(self, outcome):
        if isinstance(outcome, int):
            return Reply(outcome, self.error_body(outcome, _phrase(outcome)))
        if outcome == "timeout":
            return Reply(None, hang=self.hang_seconds)
        if outcome == "garbage":
            return Reply(200, GARBAGE)
        return Reply(200, {})

    def handle(self, request):
        """Answer one request: (status or None, body bytes, seconds to hang first, extra headers)."""
        control = request.path.startswith(CONTROL_PREFIX)
        route = self._match(request)
        if not control:
            fault = self._record(request, route)
            self.pause(self.delay)
            if fault is not None:
                return self._encode(self.fault_reply(fault))
        with self._lock:
            return self._encode(self._answer(request, route, control))

    def _record(self, request, route):
        """Count the request and return the fault queued for it, if any."""
        with self._lock:
            self.requests[f"{request.method} {route.template if route else request.path}"] += 1
            for prefix, outcomes in self._faults:
                if outcomes and request.path.startswith(prefix):
                    return outcomes.popleft()
        return None

    def _match(self, request):
        for route in self._routes:
            found = route.pattern.fullmatch(request.path)
            if found and route.method == request.method:
                request.params = found.groupdict()
                return route
        return None

    def _answer(self, request, route, control):
        try:
            if route is None:
                raise HttpError(404, self.error_body(404, f"no route for {request.method} {request.path}"))
            if not (route.public or control):
                self.authenticate(request)
            return _as_reply(route.handler(request))
        except HttpError as error:
            return Reply(error.status, error.body)
        except BadRequest as error:
            return Reply(400, self.error_body(400, str(error)))
        except (KeyError, ValueError, TypeError, AttributeError) as error:
            if not control:
                raise
            return Reply(400, {"error": f"bad control request: {error!r}"})

    @staticmethod
    def _encode(reply):
        body = reply.body if isinstance(reply.body, bytes) else b"" if reply.body is None else to_json(reply.body)
        return reply.status, body, reply.hang, reply.headers


def _as_reply(result):
    return result if isinstance(result, Reply) else Reply(200, result)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so paging 50,000 products reuses one connection
    disable_nagle_algorithm = True  # headers and body go out in two writes; Nagle would add 40 ms

    def _serve(self):
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        request = Request(self.command, url.path, _first_values(parse_qs(url.query)), self.headers, body)
        fake = self.server.fake
        try:
            status, data, hang, headers = fake.handle(request)
        except Exception:  # a simulator bug must show up as a 500, not a dropped connection
            log.exception("simulator: %s %s failed", self.command, url.path)
            status, data, hang, headers = 500, to_json(fake.error_body(500, "simulator error")), 0, {}
        fake.pause(hang)
        if status is None:
            self.close_connection = True
            return
        self._send(status, data, headers)

    def _send(self, status, data, headers):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    def log_message(self, format, *args):
        log.debug("simulator: " + format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address, fake):
        self.fake = fake
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address):
        log.debug("simulator: connection from %s dropped", client_address, exc_info=True)


def serve(fake, host, port):
    """Start `fake` on host:port in a daemon thread; returns (server, base url)."""
    server = _Server((host, port), fake)
    url = f"http://{host}:{server.server_address[1]}"
    fake.base_url = url
    fake.resume()
    threading.Thread(target=server.serve_forever, args=(0.02,), name=f"sim-{url}", daemon=True).start()
    return server, url


def shut(server):
    server.fake.halt()
    server.shutdown()
    server.server_close()
