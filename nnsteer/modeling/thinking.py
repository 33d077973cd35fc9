"""Thinking formats: how a model is prompted, where its reasoning and its answer are,
and which tokens end a chain.

A :class:`ThinkingFormat` knows one way models write their reasoning:

- ``think-tags``: ``<think> reasoning </think> answer``, the tag opened by the model or
  by the chat template's generation prompt (DeepSeek-R1 and its distills, Qwen3,
  OLMo-3-Think, Phi-4-reasoning, SmolLM3);
- ``think-brackets``: ``[THINK] reasoning [/THINK] answer`` (Magistral);
- ``harmony``: gpt-oss's channels: the reasoning is the ``analysis`` message, the answer
  the ``final`` one, and a chain ends on ``<|return|>`` or ``<|call|>``;
- ``none``: a model that does not mark its reasoning: the whole response is the reasoning.

:func:`detect` picks the format from the tokenizer's vocabulary and chat template;
:func:`choose` adds the ``--thinking-format`` / ``[model] thinking_format`` override and
the reasoning effort, giving a :class:`ThinkingChoice` (format, why, chat-template
switches) that :func:`apply_thinking` records on a loaded model and :func:`thinking_of`
reads back.

Example:
    >>> choice = choose(tokenizer, "Qwen/Qwen3-8B")
    >>> choice.format.name, choice.reason
    ('think-tags', 'the vocabulary has a </think> token; the model opens <think>')
    >>> parts = choice.format.spans(tokenizer, output_ids, response)
    >>> response[slice(*parts.reasoning)], output_ids[slice(*parts.reasoning_ids)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nnsteer.errors import BadInput, say
from nnsteer.modeling.positions import (
    decode_response,
    overlapping_tokens,
    token_offsets,
)

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
BRACKET_OPEN = "[THINK]"
BRACKET_CLOSE = "[/THINK]"

#: ``--reasoning-effort`` values (harmony's ``Reasoning:`` line), and harmony's default.
REASONING_EFFORTS = ("low", "medium", "high")
DEFAULT_REASONING_EFFORT = "medium"
#: ``--thinking-format`` values: ``auto`` detects (:func:`detect`).
AUTO = "auto"

#: ``[start, end)`` character offsets in a text.
CharRange = tuple[int, int]
#: ``[start, end)`` indices into a list of token ids.
TokenRange = tuple[int, int]


@dataclass(frozen=True)
class ResponseSpans:
    """Where the reasoning and the answer are in one response.

    ``reasoning`` and ``answer`` are ``[start, end)`` character offsets in the decoded
    response; ``reasoning_ids`` and ``answer_ids`` are ``[start, end)`` indices into the
    generated ids. A part the response lacks is empty: the answer of a chain cut before
    its reasoning ended sits at the response's end.
    """

    reasoning: CharRange
    answer: CharRange
    reasoning_ids: TokenRange
    answer_ids: TokenRange


class ThinkingFormat:
    """One way of writing reasoning: its prompt, its spans and the tokens that end it."""

    name: str = ""

    def prompt(self, tokenizer: Any, content: str, **template_kwargs: Any) -> str:
        """The chat-templated text of one user turn ``content``, ending with the assistant's
        generation prompt (``template_kwargs`` go to the chat template)."""
        messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             **template_kwargs)

    def spans(self, tokenizer: Any, output_ids: Sequence[int], response: str | None = None
              ) -> ResponseSpans:
        """The reasoning and the answer in ``output_ids`` (``response``: their decoded text,
        :func:`nnsteer.modeling.positions.decode_response`, computed if not given)."""
        ids = list(output_ids)
        text = decode_response(tokenizer, ids) if response is None else response
        reasoning, answer, token_spans = self._find(tokenizer, ids, text)
        if token_spans is None:
            offsets = token_offsets(tokenizer, ids)
            token_spans = (_token_span(offsets, *reasoning), _token_span(offsets, *answer))
        return ResponseSpans(reasoning, answer, *token_spans)

    def reasoning(self, tokenizer: Any, output_ids: Sequence[int], response: str) -> CharRange:
        """Character offsets of the reasoning in ``response`` (the decoded ``output_ids``)."""
        return self._find(tokenizer, list(output_ids), response)[0]

    def end_ids(self, tokenizer: Any) -> frozenset[int]:
        """Ids of the tokens that end the reasoning: the first of them in a chain closes it.
        Empty when the end is not one token (none, or a tag the vocabulary splits)."""
        return frozenset()

    def stop_ids(self, tokenizer: Any) -> frozenset[int]:
        """The format's own tokens that end a chain, besides the model's EOS."""
        return frozenset()

    def end_marker(self, tokenizer: Any) -> list[int]:
        """The token ids, in order, whose first appearance in a chain ends its reasoning
        (what steering by phase watches for); empty where the format has no end."""
        return []

    def _find(self, tokenizer: Any, ids: list[int], response: str
              ) -> tuple[CharRange, CharRange, tuple[TokenRange, TokenRange] | None]:
        """Reasoning and answer chars, and their id spans where the ids give them (else None)."""
        raise NotImplementedError


class NoThinking(ThinkingFormat):
    """``none``: the whole response is the reasoning; there is no separate answer."""

    name = "none"

    def _find(self, tokenizer: Any, ids: list[int], response: str
              ) -> tuple[CharRange, CharRange, tuple[TokenRange, TokenRange] | None]:
        n = len(response)
        end = _content_end(tokenizer, ids)
        return (0, n), (n, n), ((0, end), (end, end))


class TagFormat(ThinkingFormat):
    """Reasoning between an opening and a closing tag, the answer after the closing one.

    Where the closing tag is one token, the ids decide (a tag marked special, which
    decoding leaves out, still ends the reasoning); otherwise the tags are found in the
    text. The reasoning starts after the last opening tag before the closing one, or at
    0 when the prompt opened it; without a closing tag it runs to the end.
    """

    def __init__(self, name: str, open_tag: str, close_tag: str):
        self.name, self.open_tag, self.close_tag = name, open_tag, close_tag

    def end_ids(self, tokenizer: Any) -> frozenset[int]:
        """The closing tag's id where it is one token; else none."""
        close = token_id(tokenizer, self.close_tag)
        return frozenset() if close is None else frozenset({close})

    def end_marker(self, tokenizer: Any) -> list[int]:
        """The closing tag's one token, or its spelling where the vocabulary splits it (a
        model known to write the tag, such as ``smollm2-135m-r1``)."""
        close = token_id(tokenizer, self.close_tag)
        if close is not None:
            return [close]
        return list(tokenizer(self.close_tag, add_special_tokens=False)["input_ids"])

    def text_spans(self, response: str) -> tuple[CharRange, CharRange]:
        """Reasoning and answer chars found by the tags in the text alone."""
        found = response.find(self.close_tag)
        end = len(response) if found < 0 else found
        opened = response.rfind(self.open_tag, 0, end)
        start = 0 if opened < 0 else opened + len(self.open_tag)
        answer = len(response) if found < 0 else found + len(self.close_tag)
        return (start, end), (answer, len(response))

    def _find(self, tokenizer: Any, ids: list[int], response: str
              ) -> tuple[CharRange, CharRange, tuple[TokenRange, TokenRange] | None]:
        close = token_id(tokenizer, self.close_tag)
        if close is None:
            return (*self.text_spans(response), None)
        content_end = _content_end(tokenizer, ids)
        closed = close in ids
        end_index = ids.index(close) if closed else content_end
        end = len(decode_response(tokenizer, ids[:end_index])) if closed else len(response)
        opening = token_id(tokenizer, self.open_tag)
        opened = [i for i in range(end_index) if ids[i] == opening]
        first = opened[-1] + 1 if opened else 0
        start = len(decode_response(tokenizer, ids[:first])) if opened else 0
        if closed:
            answer_ids = (end_index + 1, max(content_end, end_index + 1))
            answer = (len(decode_response(tokenizer, ids[: end_index + 1])), len(response))
        else:
            answer_ids, answer = (content_end, content_end), (len(response), len(response))
        return (start, end), answer, ((first, end_index), answer_ids)


class HarmonyFormat(ThinkingFormat):
    """gpt-oss's harmony format: messages ``<|channel|>NAME<|message|> … <|end|>``.

    The reasoning is the first ``analysis`` message, the answer the first ``final`` message
    after it; a message runs to ``<|end|>``, ``<|return|>`` or ``<|call|>``, or to the end
    of a chain cut short. The prompt is the chat template's, with ``reasoning_effort``;
    a tokenizer without one gets the published harmony layout (system message with the
    ``Reasoning:`` line and the valid channels, then the user message, then
    ``<|start|>assistant``), without a date, so that prompts do not change from day to day.
    """

    name = "harmony"
    CHANNEL, MESSAGE, START, END = "<|channel|>", "<|message|>", "<|start|>", "<|end|>"
    RETURN, CALL = "<|return|>", "<|call|>"
    SYSTEM = ("You are ChatGPT, a large language model trained by OpenAI.\n"
              "Knowledge cutoff: 2024-06\n\nReasoning: {effort}\n\n"
              "# Valid channels: analysis, commentary, final. "
              "Channel must be included for every message.")

    def prompt(self, tokenizer: Any, content: str, **template_kwargs: Any) -> str:
        """The chat template's prompt, or the published harmony layout with the reasoning effort
        for a tokenizer without a template."""
        if tokenizer.chat_template:
            return super().prompt(tokenizer, content, **template_kwargs)
        effort = template_kwargs.get("reasoning_effort", DEFAULT_REASONING_EFFORT)
        return (f"{self.START}system{self.MESSAGE}{self.SYSTEM.format(effort=effort)}{self.END}"
                f"{self.START}user{self.MESSAGE}{content}{self.END}{self.START}assistant")

    def end_ids(self, tokenizer: Any) -> frozenset[int]:
        """``<|end|>``, which closes the analysis message."""
        end = token_id(tokenizer, self.END)
        return frozenset() if end is None else frozenset({end})

    def stop_ids(self, tokenizer: Any) -> frozenset[int]:
        """``<|return|>`` and ``<|call|>``, which end the assistant's turn."""
        return frozenset(filter(None, (token_id(tokenizer, t) for t in (self.RETURN, self.CALL))))

    def end_marker(self, tokenizer: Any) -> list[int]:
        """``<|channel|>final``: the answer's channel opening. ``<|end|>`` cannot serve: the
        prompt's own messages end with it."""
        return list(tokenizer(f"{self.CHANNEL}final", add_special_tokens=False)["input_ids"])

    def messages(self, tokenizer: Any, ids: Sequence[int]) -> list[tuple[str, TokenRange]]:
        """``(channel, content id span)`` of each message in ``ids``, in order."""
        channel, message = token_id(tokenizer, self.CHANNEL), token_id(tokenizer, self.MESSAGE)
        ends = {token_id(tokenizer, t) for t in (self.END, self.RETURN, self.CALL)} - {None}
        found: list[tuple[str, TokenRange]] = []
        header = content = None
        name = ""
        for i, token in enumerate(ids):
            if content is not None:
                if token in ends:
                    found.append((name, (content, i)))
                    content = None
            elif token == channel:
                header = i + 1
            elif token == message and header is not None:
                words = decode_response(tokenizer, ids[header:i]).split()
                name, content, header = (words[0] if words else ""), i + 1, None
        if content is not None:
            found.append((name, (content, len(ids))))
        return found

    def _find(self, tokenizer: Any, ids: list[int], response: str
              ) -> tuple[CharRange, CharRange, tuple[TokenRange, TokenRange] | None]:
        found = self.messages(tokenizer, ids)
        analysis = next((span for name, span in found if name == "analysis"), (0, 0))
        final = next((span for name, span in found if name == "final" and span[0] >= analysis[1]),
                     (len(ids), len(ids)))

        def chars(span: TokenRange) -> CharRange:
            return tuple(len(decode_response(tokenizer, ids[:i])) for i in span)  # type: ignore[return-value]

        return chars(analysis), chars(final), (analysis, final)


THINK_TAGS = TagFormat("think-tags", THINK_OPEN, THINK_CLOSE)
THINK_BRACKETS = TagFormat("think-brackets", BRACKET_OPEN, BRACKET_CLOSE)
HARMONY = HarmonyFormat()
NONE = NoThinking()
#: The registry, by ``--thinking-format`` name.
FORMATS: dict[str, ThinkingFormat] = {f.name: f for f in (THINK_TAGS, THINK_BRACKETS, HARMONY, NONE)}
#: What ``--thinking-format`` and ``[model] thinking_format`` accept.
FORMAT_CHOICES = (AUTO, *FORMATS)

#: Models whose vocabulary and template do not tell their format: ``{name: (format, why)}``.
KNOWN_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-r1": ("think-tags", "embedded model distilled on <think>…</think> chains; its "
                                      "vocabulary has no tag tokens, so the text has the tags"),
}


@dataclass(frozen=True)
class ThinkingChoice:
    """The format a model is run with, why, and what its chat template is given."""

    format: ThinkingFormat
    reason: str
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def reasoning_effort(self) -> str | None:
        """Harmony's reasoning effort; None for the other formats."""
        return self.template_kwargs.get("reasoning_effort")

    def prompt(self, tokenizer: Any, content: str) -> str:
        """The chat-templated prompt of one user turn (see :meth:`ThinkingFormat.prompt`)."""
        return self.format.prompt(tokenizer, content, **self.template_kwargs)

    def summary(self) -> str:
        """``NAME (why)``, with the chat-template switches it sets."""
        kwargs = ", ".join(f"{k}={v}" for k, v in self.template_kwargs.items())
        return f"{self.format.name} ({self.reason}{'; ' + kwargs if kwargs else ''})"

    def provenance(self) -> dict[str, Any]:
        """What outputs' metadata record: ``{"format", "reason", "chat_template_kwargs"}``."""
        return {"format": self.format.name, "reason": self.reason,
                "chat_template_kwargs": dict(self.template_kwargs)}

    @classmethod
    def from_provenance(cls, record: dict[str, Any]) -> ThinkingChoice:
        """The choice :meth:`provenance` recorded."""
        return cls(FORMATS[record["format"]], record["reason"], dict(record["chat_template_kwargs"]))


def token_id(tokenizer: Any, text: str) -> int | None:
    """The id of the token that is exactly ``text``, if the tokenizer has one."""
    found = tokenizer.convert_tokens_to_ids(text)
    if found is None or found == tokenizer.unk_token_id:
        return None
    return found if tokenizer.convert_ids_to_tokens(found) == text else None


def detect(tokenizer: Any, model: str | None = None) -> tuple[ThinkingFormat, str]:
    """The format of a model from its vocabulary and chat template, and why.

    In order: a named model of :data:`KNOWN_MODELS`; harmony's ``<|channel|>`` and
    ``<|message|>`` tokens; ``[THINK]``/``[/THINK]`` tokens or a template that writes
    ``[THINK]``; ``<think>``/``</think>`` tokens or a template that writes them; else
    ``none``.
    """
    if model in KNOWN_MODELS:
        name, why = KNOWN_MODELS[model]
        return FORMATS[name], why
    template = _template_text(tokenizer)
    if token_id(tokenizer, HARMONY.CHANNEL) is not None and token_id(tokenizer, HARMONY.MESSAGE) is not None:
        return HARMONY, "the vocabulary has harmony's <|channel|> and <|message|> tokens"
    for fmt in (THINK_BRACKETS, THINK_TAGS):
        opening, closing = fmt.open_tag, fmt.close_tag
        in_vocabulary = token_id(tokenizer, closing) is not None
        if not in_vocabulary and closing not in template and opening not in template:
            continue
        opener = "the chat template" if _template_opens(tokenizer, opening) else "the model"
        if in_vocabulary:
            return fmt, f"the vocabulary has a {closing} token; {opener} opens {opening}"
        if opener == "the model":
            return fmt, f"the chat template writes {opening}; the model opens it"
        return fmt, f"the chat template opens {opening}"
    return NONE, "no <think>, [THINK] or harmony tokens in the vocabulary or chat template"


def choose(tokenizer: Any, model: str | None = None, thinking_format: str | None = None,
           reasoning_effort: str | None = None, origin: str = "--thinking-format"
           ) -> ThinkingChoice:
    """The format to run ``model`` with: ``thinking_format`` (a name of :data:`FORMATS`;
    None or ``auto``: detected), and what the chat template is given: ``enable_thinking``
    for a template with that switch, harmony's ``reasoning_effort`` (default medium).
    ``origin`` names the override in its reason and errors."""
    check_format(thinking_format, origin)
    check_effort(reasoning_effort)
    detected, why = detect(tokenizer, model)
    if thinking_format in (None, AUTO):
        fmt, reason = detected, why
    else:
        fmt, reason = FORMATS[thinking_format], f"set by {origin}; detected {detected.name}: {why}"
    kwargs: dict[str, Any] = {}
    if fmt is HARMONY:
        kwargs["reasoning_effort"] = reasoning_effort or DEFAULT_REASONING_EFFORT
    elif reasoning_effort is not None:
        raise BadInput(f"reasoning effort {reasoning_effort!r}: only the harmony format has "
                       f"one, and this model's format is {fmt.name} ({reason})")
    if "enable_thinking" in _template_text(tokenizer):
        kwargs["enable_thinking"] = True
    return ThinkingChoice(fmt, reason, kwargs)


def check_format(value: str | None, origin: str = "--thinking-format") -> str | None:
    """``value`` if it is None or one of :data:`FORMAT_CHOICES`; :class:`BadInput` naming
    ``origin`` otherwise."""
    if value is not None and value not in FORMAT_CHOICES:
        raise BadInput(f"{origin} {value!r}: expected one of {', '.join(FORMAT_CHOICES)}")
    return value


def check_effort(value: str | None, origin: str = "--reasoning-effort") -> str | None:
    """``value`` if it is None or one of :data:`REASONING_EFFORTS`; :class:`BadInput` otherwise."""
    if value is not None and value not in REASONING_EFFORTS:
        raise BadInput(f"{origin} {value!r}: expected one of {', '.join(REASONING_EFFORTS)}")
    return value


def apply_thinking(lm: Any, thinking_format: str | None = None, reasoning_effort: str | None = None,
                   origin: str = "--thinking-format") -> ThinkingChoice:
    """Choose the format of a loaded model (:func:`choose`) and record it in its provenance
    (``lm.extra["thinking"]``); says so on stderr when nnsteer turns a template's
    ``enable_thinking`` switch on."""
    choice = choose(lm.tokenizer, lm.name, thinking_format, reasoning_effort, origin)
    if choice.template_kwargs.get("enable_thinking"):
        say(f"{lm.name}: the chat template has an enable_thinking switch: nnsteer turns "
            "thinking on (enable_thinking=True)")
    lm.extra["thinking"] = choice.provenance()
    return choice


def thinking_of(lm: Any) -> ThinkingChoice:
    """The format a loaded model runs with: the one :func:`apply_thinking` recorded, else
    the detected one."""
    record = lm.extra.get("thinking")
    return ThinkingChoice.from_provenance(record) if record else choose(lm.tokenizer, lm.name)


def end_of_thinking_ids(lm: Any) -> list[int]:
    """The ids, in order, whose first appearance ends a loaded model's reasoning in its
    thinking format (:meth:`ThinkingFormat.end_marker`): ``</think>``, ``[/THINK]`` or
    harmony's ``<|channel|>final``, as one token or spelled over several; empty for ``none``."""
    return thinking_of(lm).format.end_marker(lm.tokenizer)


def _template_text(tokenizer: Any) -> str:
    """The chat template's source (all named templates together); empty without one."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(str(t) for t in template.values())
    return template or ""


def _template_opens(tokenizer: Any, tag: str) -> bool:
    """Whether the chat template's generation prompt ends by opening ``tag``."""
    if not _template_text(tokenizer):
        return False
    kwargs = {"enable_thinking": True} if "enable_thinking" in _template_text(tokenizer) else {}
    try:
        rendered = NONE.prompt(tokenizer, "x", **kwargs)
    except Exception:  # a template that needs more than one user turn: it cannot tell
        return False
    return rendered.rstrip().endswith(tag)


def _content_end(tokenizer: Any, ids: list[int]) -> int:
    """The index after the last generated token that is not special (EOS, pads)."""
    special = set(getattr(tokenizer, "all_special_ids", ()))
    end = len(ids)
    while end and ids[end - 1] in special:
        end -= 1
    return end


def _token_span(offsets: Sequence[CharRange], start: int, end: int) -> TokenRange:
    """The generated tokens covering characters ``[start, end)`` as an index span; an empty
    span sits at the first token that ends after ``start``."""
    tokens = overlapping_tokens(offsets, start, end)
    if tokens:
        return tokens[0], tokens[-1] + 1
    first = next((i for i, (_, e) in enumerate(offsets) if e > start), len(offsets))
    return first, first
