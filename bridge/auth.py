"""Who may call us: G2A's client credentials, the access tokens we issue (stored hashed), and a brake on guessing."""
import base64
import binascii
import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
from datetime import timedelta

from . import db
from .errors import ContractError

TOKEN_LIFETIME = 3600
CONTRACT, METRICS = "contract", "metrics"  # what a pair may open: everything, or /metrics and /health?deep=1
_CACHE_LIMIT = 10_000


def token_hash(token):
    return hashlib.sha256(token.encode()).hexdigest()


def configured_pairs(settings):
    """(scope, client_id, client_secret) of every pair we accept: G2A's (contract) and the scrapers' (metrics)."""
    return ([(CONTRACT, pair_id, secret) for pair_id, secret in settings.api_clients()]
            + [(METRICS, pair_id, secret) for pair_id, secret in settings.metrics_clients])


def client_scope(settings, client_id, client_secret):
    """The scope of the configured pair these credentials match, or None; constant time against every pair
    (no early exit, so timing says nothing)."""
    scope = None
    for pair_scope, known_id, known_secret in configured_pairs(settings):
        id_ok = hmac.compare_digest(client_id.encode(), known_id.encode())
        secret_ok = hmac.compare_digest(client_secret.encode(), known_secret.encode())
        if id_ok & secret_ok:
            scope = pair_scope
    return scope


def basic_credentials(header):
    """(client_id, client_secret) from an `Authorization: Basic …` header, or None."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        client_id, sep, client_secret = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return (client_id, client_secret) if sep else None


class TokenStore:
    """Issues and checks Bearer tokens; only hashes reach the database, a small cache spares it per request.
    A token keeps the scope and client id of the pair it was issued to."""

    def __init__(self, settings, clock=time.time):
        self.settings, self.clock = settings, clock
        # A token of a pair removed from the configuration is refused, from the cache as from the database.
        self._clients = {(scope, client_id) for scope, client_id, _ in configured_pairs(settings)}
        self._known = {}  # token hash -> (expiry in epoch seconds, scope, client id)
        self._lock = threading.Lock()

    def issue(self, client_id, client_secret, now):
        scope = client_scope(self.settings, client_id, client_secret)
        if scope is None:
            raise ContractError(401, "AUTH02", "invalid client credentials")
        token = secrets.token_urlsafe(32)
        db.ApiToken.create(token_hash=token_hash(token), client_id=client_id, scope=scope,
                           expires_at=now + timedelta(seconds=TOKEN_LIFETIME))
        return token, TOKEN_LIFETIME

    def known(self, authorization, now):
        """True when `authorization` is `Bearer <a contract token this process already checked>`, still valid at
        `now` (epoch seconds); never asks the database (G2A's /healthcheck probe). False says nothing: check()
        decides."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        known = self._known.get(token_hash(token.strip()))
        if known is None:
            return False
        expires, scope, client_id = known
        return scope == CONTRACT and expires > now and (scope, client_id) in self._clients

    def check(self, authorization, now, scopes=(CONTRACT,)):
        """The scope of `Bearer <token we issued>` or of Basic with a configured pair; raise AUTH01/AUTH02 (401)
        when there is none, AUTH02 (403) when it is not one of `scopes`."""
        if not authorization:
            raise ContractError(401, "AUTH01", "missing Authorization header")
        pair = basic_credentials(authorization)
        if pair is not None:
            scope = client_scope(self.settings, *pair)
            if scope is None:
                raise ContractError(401, "AUTH02", "invalid client credentials")
            return _allowed(scope, scopes)
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ContractError(401, "AUTH01", "expected a Bearer token")
        scope = self._scope(token_hash(token.strip()), now)
        if scope is None:
            raise ContractError(401, "AUTH02", "invalid or expired token")
        return _allowed(scope, scopes)

    def _scope(self, digest, now):
        known = self._known.get(digest) or self._load(digest)
        if known is None:
            return None
        expires, scope, client_id = known
        return scope if expires > now.timestamp() and (scope, client_id) in self._clients else None

    def _load(self, digest):
        row = db.ApiToken.get_or_none(db.ApiToken.token_hash == digest)
        if row is None:
            return None
        known = (row.expires_at.timestamp(), row.scope, row.client_id)
        with self._lock:
            if len(self._known) >= _CACHE_LIMIT:
                self._known.clear()
            self._known[digest] = known
        return known


def _allowed(scope, scopes):
    if scope not in scopes:
        raise ContractError(403, "AUTH02", "these credentials open only /metrics and /health?deep=1")
    return scope


def delete_unconfigured_tokens(settings):
    """Delete the tokens of pairs no longer configured (check() refuses them anyway); returns how many."""
    pairs = configured_pairs(settings)
    keep = None
    for scope in (CONTRACT, METRICS):
        ids = [client_id for pair_scope, client_id, _ in pairs if pair_scope == scope]
        clause = (db.ApiToken.scope == scope) & db.ApiToken.client_id.in_(ids)
        keep = clause if keep is None else keep | clause
    return db.ApiToken.delete().where(~keep).execute()


def delete_expired_tokens(now):
    return db.ApiToken.delete().where(db.ApiToken.expires_at <= now).execute()


def address_key(ip):
    """What the brake counts by: an IPv4 address, or an IPv6 address's /64 (a customer is usually given a whole /64,
    so counting single IPv6 addresses would give a guesser 2**64 tries); IPv4-mapped IPv6 as its IPv4 address."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if address.version == 4:
        return str(address)
    if address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))


class FailureBrake:
    """Counts failed authentications per client address (see address_key); past `limit` in `window` seconds the
    address gets 429 until the window has passed. At most `capacity` addresses are remembered: when full, the
    expired go first, then the unbraked with the oldest failure, and braked ones only when nothing else is left."""

    def __init__(self, limit=20, window=60.0, clock=time.monotonic, capacity=_CACHE_LIMIT):
        self.limit, self.window, self.clock, self.capacity = limit, window, clock, capacity
        self._failures = {}  # address key -> times of its recent failures, oldest first, at most `limit`
        self._lock = threading.Lock()

    def check(self, ip):
        if self.braked(ip):
            raise ContractError(429, "AUTH03", "too many failed authentication attempts; try again later")

    def braked(self, ip):
        if not self._failures:  # the usual case, decided without parsing the address or taking the lock
            return False
        key = address_key(ip)
        with self._lock:
            return len(self._recent(key)) >= self.limit

    def failed(self, ip):
        key = address_key(ip)
        with self._lock:
            self._failures[key] = (self._recent(key) + [self.clock()])[-self.limit:]
            if len(self._failures) > self.capacity:
                self._evict(keep=key)

    def size(self):
        return len(self._failures)

    def _recent(self, key):
        cutoff = self.clock() - self.window
        recent = [t for t in self._failures.get(key, ()) if t > cutoff]
        if recent:
            self._failures[key] = recent
        else:
            self._failures.pop(key, None)
        return recent

    def _evict(self, keep):
        """Down to 90 % at once (a flood of new addresses sorts the table once per thousand, not every time), never
        dropping `keep`, the address that just failed: else, in a table full of braked addresses, a new guesser
        would be forgotten at each failure and never braked."""
        cutoff = self.clock() - self.window
        live = {key: [t for t in times if t > cutoff] for key, times in self._failures.items()}
        live = {key: times for key, times in live.items() if times}
        excess = len(live) - self.capacity * 9 // 10
        candidates = sorted((key for key in live if key != keep), key=lambda k: self._eviction_rank(live[k]))
        for key in candidates[:max(excess, 0)]:
            del live[key]
        self._failures = live

    def _eviction_rank(self, times):
        """Unbraked before braked; among the unbraked the stalest, among the braked the one released soonest."""
        is_braked = len(times) >= self.limit
        return (is_braked, times[0] if is_braked else times[-1])
