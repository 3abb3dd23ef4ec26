"""The WSGI wrapper every request passes: request id in and out, body size limit, one access line and the request
metrics; and the fast lane, where a caller with a token this process already checked skips Bottle on the hottest
routes: GET /healthcheck (G2A's liveness probe) and the app's `fast_routes` (POST /reservation)."""
import json
import logging
import re
import time

from bottle import HTTP_CODES

from .contract import error_body
from .ids import new_request_id
from .log import REQUEST_ID, event

access_log = logging.getLogger("bridge.access")
MAX_BODY_BYTES = 256 * 1024
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # fullmatch
QUIET_PATHS = ("/healthcheck", "/health", "/metrics")
STATUS_LINES = {code: f"{code} {phrase}" for code, phrase in HTTP_CODES.items()}  # as Bottle words them


class AccessLog:
    """Wraps the Bottle app. `app.known_caller(environ)` says whether the fast lane may answer: then a GET
    /healthcheck is answered 204, counted and nothing more, and a route in `app.fast_routes` ({(method, path):
    answer(body) -> (status, payload)}, errors already mapped) is answered as its Bottle route would, with the same
    access line and metrics. Anything else, and any doubt (no Content-Length, a chunked body), goes to Bottle."""

    def __init__(self, app, metrics=None):
        self.app, self.metrics = app, metrics
        self.known_caller = getattr(app, "known_caller", lambda environ: False)
        self.fast_routes = getattr(app, "fast_routes", {})
        self._healthchecks = metrics.requests.labels("GET", "/healthcheck", "204") if metrics else None

    def __call__(self, environ, start_response):
        started = time.perf_counter()
        offered = environ.get("HTTP_X_REQUEST_ID", "")
        request_id = offered if REQUEST_ID_PATTERN.fullmatch(offered) else new_request_id()
        method, path = environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")
        if path == "/healthcheck" and method == "GET" and self.known_caller(environ):
            return self._healthy(environ, start_response, request_id, started)
        token = REQUEST_ID.set(request_id)
        status_seen, route = [], [None]

        def start(status, headers, exc_info=None):
            status_seen.append(status.split(" ", 1)[0])
            return start_response(status, headers + [("X-Request-Id", request_id)], exc_info)
        try:
            if _too_large(environ):
                return self._too_large(start)
            answer = self.fast_routes.get((method, path))
            if answer is not None and _plain_body(environ) and self.known_caller(environ):
                route[0] = path
                return _fast(answer, environ, start)
            return self.app(environ, start)
        finally:
            self._log(environ, status_seen, started)
            self._count(environ, route[0], status_seen, started)
            REQUEST_ID.reset(token)

    def _healthy(self, environ, start_response, request_id, started):
        start_response("204 No Content", [("X-Request-Id", request_id)])
        if self._healthchecks is not None:
            self._healthchecks.inc()
        if access_log.isEnabledFor(logging.DEBUG):
            self._log(environ, ["204"], started)
        return []

    @staticmethod
    def _too_large(start):
        return _json(start, "413 Request Entity Too Large",
                     error_body("BR01", f"request body larger than {MAX_BODY_BYTES} bytes"))

    @staticmethod
    def _log(environ, status_seen, started):
        path = environ.get("PATH_INFO", "")
        level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
        event(access_log, "http", level=level, method=environ.get("REQUEST_METHOD"), path=path[:200],
              status=status_seen[0] if status_seen else "-", ms=round((time.perf_counter() - started) * 1000, 1))

    def _count(self, environ, fast_route, status_seen, started):
        if self.metrics is None:
            return
        route = environ.get("bottle.route")  # the rule, never the raw path: ids would make endless series
        rule = fast_route or (route.rule if route else "unmatched")
        self.metrics.request(environ.get("REQUEST_METHOD", ""), rule, status_seen[0] if status_seen else "500",
                             time.perf_counter() - started)


def _fast(answer, environ, start):
    """A fast route's JSON answer, with the headers Bottle would send."""
    status, payload = answer(environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"])))
    return _json(start, STATUS_LINES[status], payload)


def _json(start, status_line, payload):
    """`payload` as a JSON body, with the headers Bottle would send for it."""
    body = json.dumps(payload).encode()
    start(status_line, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def _plain_body(environ):
    """A body of a stated length, as Waitress hands over a request it has read whole (else Bottle reads it)."""
    return environ.get("CONTENT_LENGTH", "").isdigit() and "HTTP_TRANSFER_ENCODING" not in environ


def _too_large(environ):
    try:
        return int(environ.get("CONTENT_LENGTH") or 0) > MAX_BODY_BYTES
    except ValueError:
        return True
