"""Who may call us: G2A's client credentials, the access tokens we issue (stored hashed), and a brake on guessing."""
import base64
import binascii
import hashlib
import hmac
import secrets
import threading
import time
from datetime import timedelta

from . import db
from .errors import ContractError

TOKEN_LIFETIME = 3600
_CACHE_LIMIT = 10_000


def token_hash(token):
    return hashlib.sha256(token.encode()).hexdigest()


def client_matches(settings, client_id, client_secret):
    """Constant-time check against every configured pair (no early exit, so timing says nothing)."""
    matched = False
    for known_id, known_secret in settings.api_clients():
        id_ok = hmac.compare_digest(client_id.encode(), known_id.encode())
        secret_ok = hmac.compare_digest(client_secret.encode(), known_secret.encode())
        matched |= id_ok & secret_ok
    return matched


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
    """Issues and checks Bearer tokens; only hashes reach the database, a small cache spares it per request."""

    def __init__(self, settings, clock=time.time):
        self.settings, self.clock = settings, clock
        self._known = {}  # token hash -> expiry (epoch seconds)
        self._lock = threading.Lock()

    def issue(self, client_id, client_secret, now):
        if not client_matches(self.settings, client_id, client_secret):
            raise ContractError(401, "AUTH02", "invalid client credentials")
        token = secrets.token_urlsafe(32)
        db.ApiToken.create(token_hash=token_hash(token), client_id=client_id,
                           expires_at=now + timedelta(seconds=TOKEN_LIFETIME))
        return token, TOKEN_LIFETIME

    def known(self, authorization, now):
        """True when `authorization` is `Bearer <a token this process already checked>` not expired at `now`
        (epoch seconds); never asks the database (G2A's /healthcheck probe). False says nothing: check() decides."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        expires = self._known.get(token_hash(token.strip()))
        return expires is not None and expires > now

    def check(self, authorization, now):
        """Accept `Bearer <token we issued>` or Basic with a configured pair; raise AUTH01/AUTH02 otherwise."""
        if not authorization:
            raise ContractError(401, "AUTH01", "missing Authorization header")
        pair = basic_credentials(authorization)
        if pair is not None:
            if client_matches(self.settings, *pair):
                return
            raise ContractError(401, "AUTH02", "invalid client credentials")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ContractError(401, "AUTH01", "expected a Bearer token")
        if not self._valid(token_hash(token.strip()), now):
            raise ContractError(401, "AUTH02", "invalid or expired token")

    def _valid(self, digest, now):
        expires = self._known.get(digest)
        if expires is None:
            row = db.ApiToken.get_or_none(db.ApiToken.token_hash == digest)
            if row is None:
                return False
            expires = row.expires_at.timestamp()
            self._remember(digest, expires)
        return expires > now.timestamp()

    def _remember(self, digest, expires):
        with self._lock:
            if len(self._known) >= _CACHE_LIMIT:
                self._known.clear()
            self._known[digest] = expires


def delete_expired_tokens(now):
    return db.ApiToken.delete().where(db.ApiToken.expires_at <= now).execute()


class FailureBrake:
    """Counts failed authentications per client IP; past `limit` in `window` seconds the IP gets 429 for a while."""

    def __init__(self, limit=20, window=60.0, clock=time.monotonic):
        self.limit, self.window, self.clock = limit, window, clock
        self._failures = {}
        self._lock = threading.Lock()

    def check(self, ip):
        if self.braked(ip):
            raise ContractError(429, "AUTH03", "too many failed authentication attempts; try again later")

    def braked(self, ip):
        if ip not in self._failures:  # the usual case, decided without the lock
            return False
        with self._lock:
            return len(self._recent(ip)) >= self.limit

    def failed(self, ip):
        with self._lock:
            self._recent(ip).append(self.clock())
            if len(self._failures) > _CACHE_LIMIT:
                self._failures.clear()

    def _recent(self, ip):
        cutoff = self.clock() - self.window
        recent = [t for t in self._failures.get(ip, ()) if t > cutoff]
        self._failures[ip] = recent
        return recent
