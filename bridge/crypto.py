"""Keys at rest: Fernet encryption (AES-128-CBC + HMAC-SHA256) under BRIDGE_SECRET_KEY, key fingerprints, and
the database's memory of which key it was set up with."""
import base64
import binascii
import hashlib
import hmac
import os
import tempfile
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import db
from .errors import BridgeError, ConfigError

KEY_FILE_NAME = "secret.key"
KEY_CHECK_SETTING = "crypto.key_check"


class KeyBox:
    """Encrypts and decrypts stored game keys; fingerprints let us spot a key delivered twice."""

    def __init__(self, secret_key):
        raw = _as_fernet_key(secret_key)
        self._fernet = Fernet(raw)
        self._fingerprint_key = hashlib.sha256(b"fingerprint:" + raw).digest()
        self._key_check = hmac.new(raw, b"g2a-bridge: which key is this", hashlib.sha256).hexdigest()

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

    def key_check(self):
        """A keyed hash that tells this key from another without revealing it (stored in the database)."""
        return self._key_check


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
        _create_key_file(path)
    return KeyBox(_read_key_file(path))


def _create_key_file(path):
    """Write a new key whole and private, then link it into place: link() never replaces a file, so when two
    processes start together both end up with the first one's key, and a crash leaves no empty secret.key."""
    path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".secret.key.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(Fernet.generate_key().decode() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(temporary)


def _read_key_file(path):
    text = path.read_text().strip()
    try:
        if len(base64.urlsafe_b64decode(text.encode())) == 32:
            return text
    except (binascii.Error, ValueError):
        pass
    raise ConfigError([f"{path}: is empty or not a key this bridge wrote; restore it from your backup "
                       "(or set BRIDGE_SECRET_KEY to the key the stored keys were encrypted with)"])


def open_key_box(settings):
    """The KeyBox of this process, refused (ConfigError) when the database was set up with another key."""
    box = load_key_box(settings.bridge_secret_key, db.data_dir(settings.database_url))
    claim_database(box)
    return box


def claim_database(box):
    """Remember in the database which key it uses (the first process to ask wins); raise ConfigError if it is
    another. A database from before this check is claimed only by a key that opens a key it already stores."""
    stored = db.get_setting(KEY_CHECK_SETTING)
    if stored is None:
        _check_opens_stored_keys(box)
        db.Setting.insert(key=KEY_CHECK_SETTING, value=box.key_check()).on_conflict_ignore().execute()
        stored = db.get_setting(KEY_CHECK_SETTING)
    if not hmac.compare_digest(stored.encode(), box.key_check().encode()):
        raise _wrong_key()


def _check_opens_stored_keys(box):
    secret = stored_secret()
    if secret is None:
        return
    try:
        box.decrypt(secret)
    except BridgeError:
        raise _wrong_key() from None


def stored_secret():
    """One encrypted value from the database, or None when it holds none yet."""
    item = db.OrderItem.select(db.OrderItem.secret).where(db.OrderItem.secret.is_null(False)).first()
    return None if item is None else item.secret


def _wrong_key():
    return ConfigError(["BRIDGE_SECRET_KEY: is not the key this database was set up with; every process and host "
                        "on one database needs the same key (restore it from your backup)"])
