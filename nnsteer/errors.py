"""Errors nnsteer raises for bad input (exit 2) and for failed runs (exit 1), and its
one-line notes on stderr."""

import os
import re
import sys


class NnsteerError(Exception):
    """A run failed for a reason the user can act on; the CLI prints it on one line, exit 1."""

    exit_code = 1


class BadInput(NnsteerError):
    """Bad usage or input: a file, row, option or model that cannot be used; exit 2."""

    exit_code = 2


def first_line(exc: BaseException, empty: str | None = None) -> str:
    """The first line of an exception's message; ``empty`` (default: its type name) if none."""
    text = str(exc).strip()
    if text:
        return text.splitlines()[0]
    return type(exc).__name__ if empty is None else empty


def say(message: str) -> None:
    """One line on stderr, ``nnsteer: message``, as the CLI prints its errors."""
    print(f"nnsteer: {scrub(message)}", file=sys.stderr, flush=True)


#: Environment variables whose values are secrets, never to be printed or stored.
SECRET_VARIABLES = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "NDIF_API_KEY", "HF_TOKEN",
                    "HUGGING_FACE_HUB_TOKEN")
#: Shapes of secrets, and what each is replaced with.
_SECRET_PATTERNS = [
    (re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_\-]{6,}"), "***"),  # OpenAI / Anthropic keys
    (re.compile(r"\bhf_[A-Za-z0-9]{10,}"), "***"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]{6,}"), r"\1 ***"),
    (re.compile(r"(?i)\b((?:api[_-]?key|token|secret|password)[\"']?\s*[:=]\s*[\"']?)"
                r"[^\s\"'&,;}]{4,}"), r"\1***"),
    (re.compile(r"://[^/\s:@]+:[^/\s@]+@"), "://***@"),  # user:password@ in URLs
]


#: A run of this many characters of a secret's value (a prefix a server echoes, say) is
#: scrubbed like the whole value.
SECRET_PIECE = 8


def scrub(text: str) -> str:
    """``text`` with whatever looks like a key, token or credential replaced by ``***``:
    the values of :data:`SECRET_VARIABLES`, any run of :data:`SECRET_PIECE` or more of
    their characters, and common key shapes. Scrub before cutting a text short: a cut key
    no longer looks like one."""
    for name in SECRET_VARIABLES:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = _without_pieces(text.replace(value, "***"), value)
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _without_pieces(text: str, secret: str) -> str:
    """``text`` with every run of at least :data:`SECRET_PIECE` characters of ``secret``
    replaced by ``***``."""
    pieces = {secret[i:i + SECRET_PIECE] for i in range(len(secret) - SECRET_PIECE + 1)}
    if not pieces:
        return text
    covered = [False] * len(text)
    for i in range(len(text) - SECRET_PIECE + 1):
        if text[i:i + SECRET_PIECE] in pieces:
            covered[i:i + SECRET_PIECE] = [True] * SECRET_PIECE
    if not any(covered):
        return text
    out, i = [], 0
    while i < len(text):
        if covered[i]:
            while i < len(text) and covered[i]:
                i += 1
            out.append("***")
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def public_url(url: str | None) -> str | None:
    """``url`` without user, password or query (where keys hide), fit to be stored."""
    if url is None:
        return None
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))
