"""Logging for journald: one line per event (key=value text or JSON), request ids, secrets masked.

Configured once by an entry point with setup(); modules only call event() or use plain loggers.
"""
import contextvars
import json
import logging
import re
import sys
import time

REQUEST_ID = contextvars.ContextVar("request_id", default=None)
MASK = "***"
# Credentials that may appear in an upstream error body or a URL even when nobody registered them.
_SECRET_PATTERNS = [
    re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{6,}"),
    re.compile(r"""(?i)(["']?(?:client_secret|access_token|refresh_token|password|emailPassword|"""
               r"""secret|authHash|token)["']?\s*[:=]\s*["']?)([^"'&,\s}]{4,})"""),
    # Game keys travel as "code"/"value"; short values there are error codes (BR02), not keys.
    re.compile(r"""(?i)(["']?(?:code|value)["']?\s*[:=]\s*["']?)([^"'&,\s}]{8,})"""),
]
_QUIET_LOGGERS = {"waitress.queue": logging.ERROR, "urllib3": logging.WARNING,
                  "requests": logging.WARNING, "peewee": logging.WARNING}


# A word each pattern above needs (matched ignoring case): ASCII text with none of them cannot match any.
_PATTERN_WORDS = ("bearer", "basic", "secret", "token", "password", "authhash", "code", "value")


class Masker:
    """Replaces known secrets and anything shaped like a credential with ***."""

    def __init__(self, secrets=()):
        self.secrets = ()  # longest first, so a secret containing another is masked whole
        self.add(*secrets)

    def add(self, *values):
        # Very short values would mask ordinary words; config secrets are long.
        fresh = {v for v in values if v and len(v) >= 6}
        self.secrets = tuple(sorted(fresh.union(self.secrets), key=len, reverse=True))

    def __call__(self, text):
        for value in self.secrets:
            text = text.replace(value, MASK)
        if text.isascii() and not _has_pattern_word(text.lower()):
            return text  # most lines: the scans below cost more than the rest of the line's formatting
        text = _SECRET_PATTERNS[0].sub(lambda m: f"{m.group(1)} {MASK}", text)
        for pattern in _SECRET_PATTERNS[1:]:
            text = pattern.sub(lambda m: m.group(1) + MASK, text)
        return text


def _has_pattern_word(lowered):
    for word in _PATTERN_WORDS:
        if word in lowered:
            return True
    return False


def event(logger, name, /, level=logging.INFO, **fields):
    """Log one event: a stable name plus the ids that matter, e.g. event(log, "order.claimed", order=oid)."""
    if logger.isEnabledFor(level):  # the record made directly: no line shows the caller's file, so none is looked up
        logger.handle(logger.makeRecord(logger.name, level, "", 0, name, None, None, extra={"event_fields": fields}))


def escape_unprintable(text):
    """Every character that is not printable (ANSI escapes, BEL, NUL, DEL, C1 controls, line and bidi separators)
    as a JSON-style `\\uXXXX`, so what a caller sent can neither drive the terminal reading the log nor forge or
    hide part of a line. JSON text stays valid JSON."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _json_escape(char) for char in text)


def _json_escape(char):
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def format_value(value):
    """A field value for the text format: bare when plain, else a JSON string."""
    text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' "=\\'):
        return text
    return escape_unprintable(json.dumps(text, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    """`LEVEL logger message k=v ... request_id=…`; journald adds the timestamp."""

    def __init__(self, masker, with_time=False):
        super().__init__()
        self.masker, self.with_time = masker, with_time

    def format(self, record):
        parts = [record.levelname, record.name, escape_unprintable(record.getMessage())]
        parts += [f"{k}={format_value(v)}" for k, v in _fields(record).items()]
        if record.exc_info:
            parts.append("error=" + format_value(_exception_line(record)))
        line = " ".join(parts)
        if self.with_time:
            line = time.strftime("%H:%M:%S ", time.localtime(record.created)) + line
        return self.masker(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, same fields as the text format."""

    def __init__(self, masker):
        super().__init__()
        self.masker = masker

    def format(self, record):
        data = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                "msg": record.getMessage()}
        data.update({k: v if isinstance(v, (int, float, bool)) or v is None else str(v)
                     for k, v in _fields(record).items()})
        if record.exc_info:
            data["error"] = _exception_line(record)
        return self.masker(escape_unprintable(json.dumps(data, ensure_ascii=False)))


def _fields(record):
    fields = dict(getattr(record, "event_fields", None) or {})
    request_id = REQUEST_ID.get()
    if request_id and "request_id" not in fields:
        fields["request_id"] = request_id
    return fields


def _exception_line(record):
    """The exception as one line: type, message and the innermost frame (tracebacks only at DEBUG)."""
    exc_type, exc, tb = record.exc_info
    while tb and tb.tb_next:
        tb = tb.tb_next
    where = f" at {tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}" if tb else ""
    return f"{exc_type.__name__}: {exc}{where}"


class LineHandler(logging.StreamHandler):
    """Formats a record before it takes the handler's lock, which then covers only the write: threads logging at
    once wait for each other's write, not for each other's formatting (StreamHandler formats under the lock)."""

    def handle(self, record):
        if not self.filter(record):
            return False
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return True
        with self.lock:
            try:
                self.stream.write(line)
                self.flush()
            except Exception:
                self.handleError(record)
        return True


def setup(level="INFO", fmt="text", secrets=(), stream=None, with_time=False):
    """Configure the root logger once, at an entry point; returns the Masker so callers can add secrets."""
    masker = Masker(secrets)
    # No line shows a thread or process name, and each costs a look-up per record (logging HOWTO, "Optimization").
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = LineHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(masker) if fmt == "json" else TextFormatter(masker, with_time))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name, quiet_level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(quiet_level, logging.getLevelName(level)))
    return masker
