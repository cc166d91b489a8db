"""The server's log, without secrets: every record is rewritten so that no bearer token (and none of the
server's tokens, wherever it appears) reaches it. aiohttp logs the raw header lines of a malformed request
in its error; that is where a token would otherwise show."""

from __future__ import annotations

import logging
import re

BEARER = re.compile(r"(?i)(bearer\s+)[^\s'\"\\,;]+")


class RedactTokens(logging.Filter):
    """Rewrites every record it sees so that no bearer token, and none of the server's tokens anywhere, is
    logged (aiohttp logs the raw header lines of a malformed request in its error)."""

    def __init__(self, tokens: list[str]) -> None:
        super().__init__()
        self.tokens = sorted((t for t in tokens if t), key=len, reverse=True)

    def redact(self, text: str) -> str:
        text = BEARER.sub(r"\1[redacted]", text)
        for token in self.tokens:
            text = text.replace(token, "[redacted]")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.redact(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


def log_redacted(tokens: list[str]) -> None:
    """Send the process's log records to stderr through `RedactTokens` (and filter every handler set)."""
    redact = RedactTokens(tokens)
    root = logging.getLogger()
    for handler in root.handlers:
        handler.addFilter(redact)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    handler.addFilter(redact)
    root.addHandler(handler)
