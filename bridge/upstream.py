"""Outbound HTTP to CWS and G2A: one pooled session per service, HTTPS host allow-list, OAuth
client-credentials token cache, the request budget of each endpoint class (budget.py), and retries only where
they are safe."""
import logging
import random
import threading
import time

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import NewConnectionError

from .config import outbound_url_problem
from .errors import BudgetSpent, ConfigError, OutcomeUnknown, UpstreamError
from .log import event

log = logging.getLogger(__name__)

BACKOFF_BASE, BACKOFF_CAP, RETRY_AFTER_CAP = 0.5, 8.0, 30.0
REFRESH_AT = 0.8  # share of a token's lifetime after which we fetch a new one
POOL_SIZE = 16


class TokenCache:
    """An OAuth client-credentials token, one per client object, thread-safe; fetched again once 80% of
    its lifetime has passed and after invalidate()."""

    def __init__(self, fetch, clock=time.monotonic):
        self._fetch, self._clock = fetch, clock
        self._lock = threading.Lock()
        self._token = self.obtained_at = self._refresh_at = None

    def get(self):
        # Fetching under the lock is deliberate: the token endpoint is rate-limited, so one
        # thread fetches while the others wait for its result.
        with self._lock:
            if self._token is None or self._clock() >= self._refresh_at:
                token, expires_in = self._fetch()
                self.obtained_at = self._clock()
                self._token, self._refresh_at = token, self.obtained_at + REFRESH_AT * expires_in
            return self._token

    def invalidate(self, token=None):
        """Forget the token; given `token`, only if it is still the current one (a 401 seen by many threads
        at once then costs one fetch, not one each)."""
        with self._lock:
            if token is None or token == self._token:
                self._token = self.obtained_at = None

    @property
    def age_seconds(self):
        obtained_at = self.obtained_at
        return None if obtained_at is None else self._clock() - obtained_at


class Upstream:
    """One outbound service: base URL, pooled session, token, budgets and retries.

    request() returns the parsed JSON body or raises UpstreamError (OutcomeUnknown for a write that may
    have happened, BudgetSpent when told not to wait for its endpoint class's budget)."""

    def __init__(self, service, base_url, timeout, retry_max, token=None, allowed_hosts=(), budgets=None,
                 retryable=None, sleep=time.sleep, observer=None, user_agent="g2a-bridge"):
        problem = outbound_url_problem(base_url, allowed_hosts)
        if problem:
            raise ConfigError([f"{service} base URL {problem}"])
        self.service, self.base_url = service, base_url.rstrip("/")
        self.timeout, self.retry_max, self.token, self.budgets = (timeout, timeout), retry_max, token, budgets
        self._retryable, self._sleep, self._observer = retryable, sleep, observer
        self._random = random.Random()
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_maxsize=POOL_SIZE, max_retries=0)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        self.session.headers.update({"User-Agent": user_agent, "Accept": "application/json"})

    def request(self, method, path, *, budget=None, wait=True, params=None, json_body=None, form=None,
                idempotent=True, auth=True, endpoint=None, before_send=None):
        """`budget` names the endpoint class whose budget each attempt spends (budget.py; None: unmetered); with
        wait=False an attempt that finds no free slot raises BudgetSpent instead of waiting for one.
        `before_send()` runs right before each attempt goes out, after any token fetch and budget wait (it may
        raise to stop the call): a purchase records there when it was last sent."""
        endpoint = endpoint or path
        options = {"params": params, "json": json_body, "data": form}
        spend = self._spender(budget, wait, endpoint)
        attempt = retries = 0
        refreshed = False
        while True:
            attempt += 1
            token = self.token.get() if auth and self.token else None
            response = None
            try:
                spend.take(retry=attempt > 1)
                if before_send is not None:
                    before_send()
                response = self._send(method, path, endpoint, token, attempt, idempotent, options)
                spend.answered(response)
                if response.status_code == 401 and token and not refreshed:
                    # A 401 means nothing was done, so even a purchase may be sent again, once.
                    self.token.invalidate(token)
                    refreshed = True
                    continue
                return self._result(response, endpoint, idempotent)
            except BudgetSpent:
                raise
            except UpstreamError as err:
                if response is None:
                    spend.unanswered()
                if not (idempotent and err.retryable and retries < self.retry_max):
                    raise
                retries += 1
                self._back_off(err, response, retries, endpoint, attempt, spend.holds(response))

    def _spender(self, name, wait, endpoint):
        budget = self.budgets[name] if self.budgets is not None and name is not None else None
        return _Spender(self.service, budget, wait, endpoint)

    def _send(self, method, path, endpoint, token, attempt, idempotent, options):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        started = time.monotonic()
        try:
            # No redirects: following one could carry the bearer token to a host off the allow-list.
            response = self.session.request(method, self.base_url + path, headers=headers, timeout=self.timeout,
                                            allow_redirects=False, **options)
        except requests.RequestException as exc:
            self._observe(method, endpoint, "timeout" if isinstance(exc, requests.Timeout) else "error",
                          started, attempt)
            raise self._transport_error(exc, endpoint, idempotent) from exc
        self._observe(method, endpoint, response.status_code, started, attempt)
        return response

    def _transport_error(self, exc, endpoint, idempotent):
        what = f"{endpoint}: {'timed out' if isinstance(exc, requests.Timeout) else 'connection failed'}"
        # A connect timeout or a refused / unresolvable connection happens before a single byte of
        # the request is written, so even a purchase cannot have happened: safe to try again. Any
        # later failure (read timeout, reset, truncated answer) may follow a request the server
        # already acted on, so for a non-idempotent call the outcome is unknown.
        if idempotent or _never_sent(exc):
            return UpstreamError(self.service, f"{what} ({_describe(exc)})", retryable=True)
        return OutcomeUnknown(self.service, f"{what} after the request may have been sent ({_describe(exc)})")

    def _result(self, response, endpoint, idempotent):
        status = response.status_code
        if 200 <= status < 300:
            return self._json(response, endpoint, idempotent)
        message, code = error_details(response)
        if status >= 500 and not idempotent:
            raise OutcomeUnknown(self.service, f"{endpoint}: HTTP {status} after sending: {message}")
        retryable = status == 429 or status >= 500 or bool(self._retryable and self._retryable(response))
        raise UpstreamError(self.service, message, status=status, retryable=retryable, code=code)

    def _json(self, response, endpoint, idempotent):
        if not response.content.strip():
            return {}
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, (dict, list)):
            return body
        if not idempotent:  # the write succeeded but we cannot read what it did
            raise OutcomeUnknown(self.service, f"{endpoint}: HTTP {response.status_code} with malformed JSON")
        raise UpstreamError(self.service, f"malformed JSON in the {endpoint} response",
                            status=response.status_code, retryable=True)

    def _back_off(self, err, response, retry, endpoint, attempt, held):
        """Wait before a retry: a 429's hold is the budget's (the next attempt waits for it), else Retry-After
        (capped) or exponential backoff with jitter."""
        wait = held if held is not None else _retry_after(response)
        if wait is None:
            wait = self._random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (retry - 1)))
        event(log, "upstream.retry", level=logging.WARNING, service=self.service, endpoint=endpoint,
              status=err.status or "error", attempt=attempt, wait=round(wait, 3))
        if held is None:
            self._sleep(wait)

    def _observe(self, method, endpoint, status, started, attempt):
        if self._observer is None:
            return
        try:
            self._observer(self.service, method, endpoint, status, time.monotonic() - started, attempt)
        except Exception:  # a metrics bug must never turn a finished purchase into an error
            log.exception("upstream observer failed")


class _Spender:
    """One request's dealings with the budget of its endpoint class (none: nothing to do)."""

    def __init__(self, service, budget, wait, endpoint):
        self.service, self.budget, self.wait, self.endpoint = service, budget, wait, endpoint
        self._hold = None
        self._taken = False  # a slot is held for an attempt that has not been answered yet

    def take(self, retry):
        """A slot for the next attempt. A caller that will not wait still waits out the short hold a 429 puts on a
        retry (at most RETRY_AFTER_CAP): it was already sent once, and giving up would waste that."""
        if self.budget is None:
            return
        if not self.wait and not self.budget.acquire(timeout=RETRY_AFTER_CAP if retry else 0):
            raise BudgetSpent(self.service, f"{self.endpoint}: the {self.budget.name} request budget is spent")
        if self.wait:
            self.budget.acquire()
        self._taken = True

    def unanswered(self):
        """The attempt got no HTTP answer (or never went out): its slot goes back to the budget."""
        if self._taken:
            self.budget.give_back()
            self._taken = False

    def answered(self, response):
        """Tell the budget how the upstream answered: a 429 slows the class and holds it for a while."""
        self._hold, self._taken = None, False
        if self.budget is None:
            return
        if response.status_code == 429:
            self._hold = self.budget.throttled(_retry_after(response, cap=None))
        else:
            self.budget.answered()

    def holds(self, response):
        """The hold the budget put on a 429 (the next attempt's take() waits it out), else None."""
        return self._hold if response is not None and response.status_code == 429 else None


def fetch_client_token(upstream, path, client_id, client_secret, budget=None):
    """(access_token, expires_in) from an OAuth client-credentials endpoint; both CWS and G2A use it.

    Rejected credentials (HTTP 400 or 401) always surface as UpstreamError with status=401,
    which is what alerting looks for; any other failure keeps its own status.
    """
    form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": client_secret}
    try:
        body = upstream.request("POST", path, budget=budget, form=form, auth=False)
    except UpstreamError as err:
        if err.status not in (400, 401):
            raise
        raise UpstreamError(upstream.service, f"authentication failed: {err.message}", status=401) from err
    # CWS documents two shapes: OAuth's access_token/expires_in and Spring's value/expiresIn.
    body = body if isinstance(body, dict) else {}
    token = body.get("access_token") or body.get("value")
    expires_in = body.get("expires_in", body.get("expiresIn"))
    if not isinstance(token, str) or not token:
        raise UpstreamError(upstream.service, f"token response from {path} has no access_token (or value)")
    if not _positive_number(expires_in):
        raise UpstreamError(upstream.service, f"token response from {path} has no positive expires_in "
                                              "(or expiresIn)")
    return token, float(expires_in)


def error_details(response):
    """(message, code) from an error body: CWS {message, code}, OAuth {error_description, error},
    G2A {errors: [{code, message}]}, or the start of a non-JSON body."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:200] or f"HTTP {response.status_code}", None
    body = body if isinstance(body, dict) else {}
    errors = body.get("errors")
    first = errors[0] if isinstance(errors, list) and errors and isinstance(errors[0], dict) else {}
    message = (body.get("message") or body.get("error_description") or body.get("error")
               or first.get("message") or f"HTTP {response.status_code}")
    code = body.get("code", first.get("code"))
    # CWS codes are numbers (10002) but may arrive as text; callers compare err.code == 10002.
    if isinstance(code, str) and code.isdigit():
        code = int(code)
    return str(message), code


def _never_sent(exc):
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0] if exc.args else None, "reason", None)
    return isinstance(reason, NewConnectionError)  # refused, unreachable or DNS failure


def _describe(exc):
    return type(exc).__name__ + (f": {str(exc)[:200]}" if str(exc) else "")


def _retry_after(response, cap=RETRY_AFTER_CAP):
    """Seconds from a Retry-After header (clamped to [0, cap] unless cap is None), or None; the HTTP-date form is
    ignored."""
    value = response.headers.get("Retry-After") if response is not None else None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if cap is None else min(max(seconds, 0.0), cap)


def _positive_number(value):
    try:
        return not isinstance(value, bool) and float(value) > 0
    except (TypeError, ValueError):
        return False
