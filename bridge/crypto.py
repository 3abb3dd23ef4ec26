"""Keys at rest: Fernet encryption (AES-128-CBC + HMAC-SHA256) under BRIDGE_SECRET_KEY, and key fingerprints."""
import base64
import binascii
import hashlib
import hmac
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import BridgeError

KEY_FILE_NAME = "secret.key"


class KeyBox:
    """Encrypts and decrypts stored game keys; fingerprints let us spot a key delivered twice."""

    def __init__(self, secret_key):
        raw = _as_fernet_key(secret_key)
        self._fernet = Fernet(raw)
        self._fingerprint_key = hashlib.sha256(b"fingerprint:" + raw).digest()

    def encrypt(self, value):
        data = value.encode() if isinstance(value, str) else value
        return self._fernet.encrypt(data).decode("ascii")

    def decrypt(self, token):
        try:
            return self._fernet.decrypt(token.encode("ascii"))
        except InvalidToken:
            raise BridgeError("a stored key cannot be decrypted: BRIDGE_SECRET_KEY changed?") from None

    def decrypt_text(self, token):
        return self.decrypt(token).decode()

    def fingerprint(self, value):
        data = value.encode() if isinstance(value, str) else value
        return hmac.new(self._fingerprint_key, data, hashlib.sha256).hexdigest()


def _as_fernet_key(secret_key):
    """A Fernet key as given, or one derived from any other passphrase with HKDF."""
    try:
        if len(base64.urlsafe_b64decode(secret_key.encode())) == 32:
            return secret_key.encode()
    except (binascii.Error, ValueError):
        pass
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"g2a-bridge", info=b"keys-at-rest")
    return base64.urlsafe_b64encode(derived.derive(secret_key.encode()))


def load_key_box(configured_key, folder):
    """The KeyBox for BRIDGE_SECRET_KEY, or for a key generated once into `folder` (mode 0600)."""
    if configured_key:
        return KeyBox(configured_key)
    path = Path(folder) / KEY_FILE_NAME
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # the other process made it first
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(Fernet.generate_key().decode() + "\n")
    return KeyBox(path.read_text().strip())
