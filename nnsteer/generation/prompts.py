"""The task prompt a model sees: the user-turn presets around a task, chat-templated in the
model's thinking format, and its token ids.

Example:
    >>> chat_prompt(tokenizer, "What is 17 * 23?", "released-thinking")
"""

from __future__ import annotations

from typing import Any

from nnsteer.errors import BadInput
from nnsteer.modeling.thinking import ThinkingChoice, choose

#: The default user turn around every task prompt (preset ``step-by-step``): the wording
#: the released code's comparison script gives *non-thinking* models. One wording for
#: every model keeps chains comparable; it makes a non-thinking model write its reasoning
#: out, and for such a model the whole response is the reasoning.
TASK_TEMPLATE = (
    "Please answer the following question:\n\n{prompt}\n\n"
    "It requires a few steps of reasoning. So first, think step by step, "
    "and only then give the final answer."
)
#: The user-turn presets (``--prompt-template``): ``released-thinking`` is the bare task,
#: as the released steering pipeline sends it (``generate_responses.py``,
#: ``evaluate_steering.py``); ``released-comparison`` is what its comparison script gives
#: thinking models (``compare_reasoning.py``); ``step-by-step`` is :data:`TASK_TEMPLATE`.
PROMPT_TEMPLATES: dict[str, str] = {
    "step-by-step": TASK_TEMPLATE,
    "released-thinking": "{prompt}",
    "released-comparison": "Please answer the following question:\n\n{prompt}",
}
DEFAULT_PROMPT_TEMPLATE = "step-by-step"


def check_prompt_template(name: str) -> str:
    """``name`` if it is a preset of :data:`PROMPT_TEMPLATES`; :class:`BadInput` otherwise."""
    if name not in PROMPT_TEMPLATES:
        raise BadInput(f"--prompt-template {name!r}: expected one of {', '.join(PROMPT_TEMPLATES)}")
    return name


def chat_prompt(tokenizer: Any, task_prompt: str, template: str = DEFAULT_PROMPT_TEMPLATE,
                thinking: ThinkingChoice | None = None) -> str:
    """The chat-templated text of one task in the user turn of preset ``template``, ending
    with the assistant's generation prompt, as the thinking format renders it (``thinking``;
    default: detected from the tokenizer, :func:`nnsteer.modeling.thinking.choose`)."""
    content = PROMPT_TEMPLATES[check_prompt_template(template)].format(prompt=task_prompt)
    return (thinking or choose(tokenizer)).prompt(tokenizer, content)


def prompt_token_ids(tokenizer: Any, task_prompt: str, template: str = DEFAULT_PROMPT_TEMPLATE,
                     thinking: ThinkingChoice | None = None) -> list[int]:
    """The token ids the model sees for one task (the template supplies BOS if any)."""
    return tokenizer(chat_prompt(tokenizer, task_prompt, template, thinking),
                     add_special_tokens=False)["input_ids"]
