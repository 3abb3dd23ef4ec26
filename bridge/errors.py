"""The exceptions the bridge raises, one line each; web.py maps them to HTTP, cli.py to exit codes."""


class BridgeError(Exception):
    """An expected failure with a one-line human reason (CLI exit code 1)."""


class ConfigError(BridgeError):
    """The configuration is unusable; `problems` lists every reason at once (exit code 2)."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class ContractError(BridgeError):
    """An answer to G2A: HTTP status plus the contract's {code, message} body."""

    def __init__(self, status, code, message, extra=None):
        self.status, self.code, self.message = status, code, message
        self.extra = extra or {}
        super().__init__(f"{status} {code}: {message}")

    def body(self):
        return {"code": self.code, "message": self.message, **self.extra}


class UpstreamError(BridgeError):
    """CWS or G2A answered badly or not at all; `retryable` says whether trying again may help."""

    def __init__(self, service, message, status=None, retryable=False, code=None):
        self.service, self.status, self.retryable, self.code = service, status, retryable, code
        self.message = message
        super().__init__(f"{service}: {message}" + (f" (HTTP {status})" if status else ""))


class OutcomeUnknown(UpstreamError):
    """A write was sent but no answer came back: it may or may not have happened. Never retry blindly."""

    def __init__(self, service, message):
        super().__init__(service, message, retryable=False)


class BudgetSpent(UpstreamError):
    """Not sent: this process's request budget for the endpoint class has no slot free now (a caller that would
    rather answer from its cache than wait)."""
