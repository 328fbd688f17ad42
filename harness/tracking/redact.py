"""Credentials never leave the process: what every tracking record, artifact and error line goes through."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

_URI_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"]+@")

_QUERY_SECRET = re.compile(r"(?i)([?&](?:token|access_token|password|api_key|key|sig|signature)=)[^&\s'\"]+")

_SECRET_NAME = re.compile(r"(?i)(password|passwd|secret|token|api[_-]?key|credential)")

# `password: x`, `"api_key": "x"`, `TOKEN=x` in YAML/JSON/env-style text.
_KV_SECRET = re.compile(
    r"""(?i)(["']?[\w.-]*(?:password|passwd|secret|token|api[_-]?key)[\w.-]*["']?\s*[:=]\s*["']?)[^\s"',}&]+"""
)


def _secret_env_values() -> list[str]:
    # Values of secret-looking variables (MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN, ...);
    # short values are skipped so that e.g. "1" is not blanked out everywhere.
    return [v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 6]

def redact(text: str) -> str:
    """Remove credentials from text: `user:pass@` in URIs, token query parameters, values of
    password/token/secret keys, and the values of secret environment variables."""
    text = _URI_USERINFO.sub(r"\g<scheme>***@", str(text))
    text = _QUERY_SECRET.sub(r"\1***", text)
    text = _KV_SECRET.sub(r"\1***", text)
    for value in _secret_env_values():
        text = text.replace(value, "***")
    return text

def redact_value(key: str, value: Any) -> str:
    return "***" if _SECRET_NAME.search(key) and value not in (None, "") else redact(str(value))

def short_error(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
    return redact(first)[:200]

_TEXT_SUFFIXES = {".yaml", ".yml", ".json", ".jsonl", ".txt", ".log", ".cfg", ".toml", ".ini"}


@contextlib.contextmanager
def redacted_copy(path: Path):
    """The file itself, or for a text file holding a credential a redacted copy of it."""
    if path.suffix.lower() not in _TEXT_SUFFIXES:
        yield path
        return
    text = path.read_text(errors="replace")
    clean = redact(text)
    if clean == text:
        yield path
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mimo-redacted-") as tmp:
        copy = Path(tmp) / path.name
        copy.write_text(clean)
        yield copy

@contextlib.contextmanager
def redacted_stdout():
    import io
    import sys

    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        sys.stdout.write(redact(buf.getvalue()))
