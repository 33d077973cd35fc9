"""The LLM annotator: any OpenAI-compatible Chat Completions server (default GPT-4o).

A reply is accepted only when its spans with known labels cover :data:`MIN_COVERAGE`
of the reasoning; a text whose replies are not (or whose response is malformed) is
reported as failed, is not cached, and is asked again on the next run. Accepted replies
are cached on disk per (model, prompt version or hash, text), so a rerun never pays
twice; the ``openai`` client retries 429, 5xx and timeouts with exponential backoff.
Error text is scrubbed of keys before it is stored or printed.
The key comes from ``OPENAI_API_KEY`` only. Requests ask for temperature 0; a model that
refuses it (reasoning models such as ``gpt-5``) is asked at its default temperature
instead, with one line on stderr.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tqdm.auto import tqdm

from nnsteer.annotation.spans import Span, parse_annotation
from nnsteer.errors import BadInput, first_line, public_url, say, scrub
from nnsteer.labels import LABELS, OK
from nnsteer.modeling.models import model_slug
from nnsteer.runs.store import write_json

API_KEY_ENV = "OPENAI_API_KEY"
#: The LLM annotator's default model, and the one ``--annotator auto`` picks with an API key.
DEFAULT_ANNOTATOR_MODEL = "gpt-4o"
#: Bump when PROMPT changes: cached replies of other versions are not reused.
PROMPT_VERSION = "1"
#: A reply is accepted when its labelled spans cover this share of the reasoning's
#: non-space characters (the GPT-4o annotations in the paper's released data: median
#: 0.91-1.0 per model; 397 of 400 above 0.5).
MIN_COVERAGE = 0.5
DEFAULT_TIMEOUT = 120.0  # seconds per request
DEFAULT_RETRIES = 3  # after a 429, a 5xx or a timeout, with exponential backoff
T = TypeVar("T")

_MEANINGS = {
    "initializing": "restating the problem, setting the goal, or planning the first steps",
    "deduction": "deriving a conclusion from what is already known or computed",
    "adding-knowledge": "bringing in a fact, definition, formula or piece of world knowledge "
                        "that is not stated in the problem",
    "example-testing": "trying a concrete example, case or value to test an idea",
    "uncertainty-estimation": "expressing doubt or confidence, or weighing whether something "
                              "is right",
    "backtracking": "abandoning or revising an earlier approach or claim and trying another",
}

PROMPT = (
    "You label the reasoning of a language model with behaviours.\n\n"
    "Behaviours:\n"
    + "".join(f'- "{label}": {_MEANINGS[label]}\n' for label in LABELS)
    + "\nSplit the reasoning into consecutive parts and write every part as\n"
    '["label"]exact text of the part["end-section"]\n'
    "Copy the text exactly, in order, without changing, adding or leaving out words. "
    "A part is usually one sentence; split a sentence whose halves show different "
    "behaviours. Use only the six labels above. Reply with the labelled text only."
)


#: Where a prompt given by the user (``--annotator-prompt FILE``) wants the reasoning: the
#: released code's placeholder. A prompt without it is sent as the system message.
TEXT_PLACEHOLDER = "{thinking}"


def prompt_digest(prompt: str) -> str:
    """A short SHA-256 of a user-given prompt: its cache key and its name in metadata."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def prompt_messages(text: str, prompt: str | None = None) -> list[dict[str, str]]:
    """The Chat Completions messages for ``text``: nnsteer's :data:`PROMPT` as the system
    message, or ``prompt`` (the reasoning in place of :data:`TEXT_PLACEHOLDER`, if any)."""
    if prompt is None:
        prompt = PROMPT
    elif TEXT_PLACEHOLDER in prompt:
        return [{"role": "user", "content": prompt.replace(TEXT_PLACEHOLDER, text)}]
    return [{"role": "system", "content": prompt}, {"role": "user", "content": text}]


@dataclass(frozen=True)
class Failed:
    """A text the annotator could not annotate, and why."""

    reason: str


class LLMAnnotator:
    """Annotates texts through a Chat Completions endpoint, with an on-disk reply cache."""

    def __init__(self, model: str = DEFAULT_ANNOTATOR_MODEL, *, base_url: str | None = None,
                 cache_dir: Path | None = None, max_retries: int = DEFAULT_RETRIES,
                 timeout: float = DEFAULT_TIMEOUT, prompt: str | None = None) -> None:
        self.model = model
        self.prompt = prompt
        self.prompt_key = f"v{PROMPT_VERSION}" if prompt is None else f"p{prompt_digest(prompt)}"
        self.base_url = base_url
        self.cache_dir = cache_dir
        self.max_retries = max_retries
        self.timeout = timeout
        self._client = None
        self._temperature: float | None = 0.0
        self._lock = threading.Lock()

    def cache_path(self, text: str) -> Path | None:
        """Where the reply for ``text`` is cached (per model and prompt); None without a cache."""
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256(text.encode()).hexdigest()
        return Path(self.cache_dir) / model_slug(self.model) / f"{self.prompt_key}-{digest}.json"

    def cached(self, text: str) -> str | None:
        """The cached reply for ``text``, if any; a damaged entry (not UTF-8 JSON, or its
        reply not text) counts as none, so the reply is asked for again and the entry
        replaced."""
        path = self.cache_path(text)
        if path is None or not path.is_file():
            return None
        try:
            entry = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        reply = entry.get("reply") if isinstance(entry, dict) else None
        return reply if isinstance(reply, str) else None

    def connect(self) -> None:
        """Create the client; :class:`BadInput` if no key is set (unless a server is named)."""
        import openai

        key = os.environ.get(API_KEY_ENV)
        if not key and self.base_url is None:
            raise BadInput(f"the openai:{self.model} annotator needs {API_KEY_ENV} in the "
                           "environment (or --base-url for a server without keys)")
        self._client = openai.OpenAI(base_url=self.base_url, api_key=key or "none",
                                     max_retries=self.max_retries, timeout=self.timeout)

    def messages(self, text: str) -> list[dict[str, str]]:
        """The Chat Completions messages that ask about ``text`` (:func:`prompt_messages`)."""
        return prompt_messages(text, self.prompt)

    def request(self, text: str) -> str:
        """One Chat Completions request (temperature 0 unless the model refused it); the
        reply's text. :class:`BadReply` for a reply without text or cut off by its length."""
        import openai

        temperature = self._temperature
        options = {} if temperature is None else {"temperature": temperature}
        try:
            reply = self._client.chat.completions.create(
                model=self.model,
                messages=self.messages(text),
                **options,
            )
        except openai.BadRequestError as exc:
            if temperature is None or "temperature" not in str(exc):
                raise
            self._drop_temperature()
            return self.request(text)
        choices = getattr(reply, "choices", None)
        if not choices or getattr(choices[0], "message", None) is None:
            raise BadReply("a reply without choices")
        if choices[0].finish_reason == "length":
            raise BadReply("a reply cut off at its length limit")
        content = choices[0].message.content or ""
        if not isinstance(content, str):
            raise BadReply("a reply whose content is not text")
        return content

    def _drop_temperature(self) -> None:
        """Ask at the model's default temperature from now on, saying so once."""
        with self._lock:
            if self._temperature is not None:
                self._temperature = None
                say(f"openai:{self.model} does not accept temperature 0; annotating at its "
                    "default temperature (labels may differ between runs)")

    def annotate(self, text: str) -> list[Span] | Failed:
        """Spans of ``text`` from the cache or the server, if the reply is acceptable
        (:func:`unacceptable`); see :meth:`ask`."""
        def accept(reply: str) -> tuple[list[Span], str | None]:
            spans = parse_annotation(reply, text)
            return spans, unacceptable(spans, text)

        return self.ask(text, accept)

    def ask(self, text: str, accept: Callable[[str], tuple[T, str | None]]) -> T | Failed:
        """What ``accept`` makes of the reply about ``text`` (from the cache or the server),
        if it accepts it (its second value, the problem, is None); another reply is asked
        for once, then the text is reported as :class:`Failed`. Only accepted replies are cached."""
        import openai

        reply = self.cached(text)
        if reply is not None:
            value, problem = _judged(accept, reply)
            if problem is None:
                return value
        problem = "no reply"
        for _ in range(2):
            try:
                reply = self.request(text)
            except openai.AuthenticationError:
                raise BadInput(f"{API_KEY_ENV} was rejected by "
                               f"{public_url(self.base_url) or 'the OpenAI API'}") from None
            except openai.APIError as exc:
                return Failed(scrub(f"{type(exc).__name__}: {first_line(exc)}")[:200])
            except BadReply as exc:
                problem = str(exc)
                continue
            except Exception as exc:  # a malformed response fails this text only
                return Failed(scrub(f"malformed response ({type(exc).__name__}: "
                                    f"{first_line(exc)})")[:200])
            value, problem = _judged(accept, reply)
            if problem is None:
                path = self.cache_path(text)
                if path is not None:
                    write_json(path, {"model": self.model, "prompt_version": PROMPT_VERSION,
                                      "prompt_key": self.prompt_key, "reply": reply})
                return value
        shown = f"{problem}: {scrub(reply)[:80]!r}" if reply else problem  # scrubbed, then cut
        return Failed(scrub(shown)[:200])

    def cancel(self) -> None:
        """Abort the requests in flight (their threads then end at once)."""
        if self._client is not None:
            self._client.close()


def _judged(accept: Callable[[str], tuple[T, str | None]], reply: str) -> tuple[T | None, str | None]:
    """``accept(reply)``; a reply it fails on is a problem, like any unacceptable reply."""
    try:
        return accept(reply)
    except Exception as exc:  # the parsers are total; this is a backstop, per text
        return None, f"reply could not be read ({type(exc).__name__})"


class BadReply(Exception):
    """A reply that is not an annotation at all (no choices, truncated)."""


def unacceptable(spans: Sequence[Span], text: str) -> str | None:
    """Why a reply's ``spans`` of ``text`` are not an annotation, or None if they are.

    Accepted: spans with one of the six labels (status ``ok``) that cover at least
    :data:`MIN_COVERAGE` of the text's non-space characters.
    """
    covered = [False] * len(text)
    for span in spans:
        if span.status == OK:
            covered[span.start:span.end] = [True] * (span.end - span.start)
    total = sum(not c.isspace() for c in text)
    share = sum(flag and not c.isspace() for flag, c in zip(covered, text)) / total if total else 1.0
    if share >= MIN_COVERAGE:
        return None
    if not spans:
        return "reply has no labels"
    if not any(span.status == OK for span in spans):
        return "reply places no labelled span on the text"
    return f"reply covers {share:.0%} of the reasoning (at least {MIN_COVERAGE:.0%} needed)"


def annotate_texts(
    texts: Sequence[str], *, model: str = DEFAULT_ANNOTATOR_MODEL, base_url: str | None = None,
    workers: int = 8, cache_dir: Path | None = None, progress: bool = True,
    retries: int = DEFAULT_RETRIES, timeout: float = DEFAULT_TIMEOUT, prompt: str | None = None,
) -> list[list[Span] | Failed]:
    """Annotate ``texts`` concurrently (``workers`` requests at a time), in input order.

    Each request waits ``timeout`` seconds at most and is retried ``retries`` times after
    a 429, a 5xx or a timeout. Ctrl-C cancels the requests not yet made and aborts those
    in flight. ``prompt`` replaces nnsteer's (see :func:`prompt_messages`).
    """
    annotator = LLMAnnotator(model, base_url=base_url, cache_dir=cache_dir,
                             max_retries=retries, timeout=timeout, prompt=prompt)
    return ask_all(annotator, texts, annotator.annotate, workers=workers, progress=progress,
                   desc=f"annotate ({model})")


def ask_all(
    client: LLMAnnotator, texts: Sequence[str], ask: Callable[[str], T | Failed], *,
    workers: int = 8, progress: bool = True, desc: str = "ask",
) -> list[T | Failed]:
    """``ask(text)`` for every text, ``workers`` at a time, in input order; ``client``
    connects first unless every text's reply is cached.

    Ctrl-C cancels the requests not yet made and aborts those in flight.
    """
    if any(client.cached(t) is None for t in texts):
        client.connect()
    results: list[T | Failed] = [Failed("not run")] * len(texts)
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = {pool.submit(ask, t): i for i, t in enumerate(texts)}
        bar = tqdm(as_completed(futures), total=len(futures), disable=not progress,
                   desc=desc, unit="chain")
        for future in bar:
            results[futures[future]] = future.result()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        client.cancel()
        raise
    pool.shutdown()
    return results
