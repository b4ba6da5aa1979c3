"""Prompt templates for math problems: plain text, or the tokenizer's chat template.

Formats (``instruction`` defaults to :data:`INSTRUCTION`):

- ``"plain"`` (:func:`plain_prompt`), for base models::

      Question: {problem}
      {instruction}
      Answer:

  with the problem stripped of surrounding whitespace, no trailing space or newline after
  ``Answer:``, and the instruction line left out when the instruction is empty.
- ``"chat"`` (:func:`chat_prompt`), for instruction-tuned models: one user message
  ``"{problem}\\n{instruction}"`` (just the problem when the instruction is empty), after an
  optional system message, rendered by ``tokenizer.apply_chat_template`` with the generation prompt
  (the opening of the assistant's turn) appended.

GSM8K. A GSM8K reference is a worked solution ending in ``#### 72``; the rewards need nothing from
the prompt for it: :func:`jackpot_jax.data.rewards.extract_answer` takes the reference's ``####``
answer, and reads a completion's final answer from its last ``\\boxed{}`` or, failing that, its last
``####`` line. So the default instruction works for GSM8K as for MATH. :data:`GSM8K_INSTRUCTION`
asks for the ``#### N`` line instead, as in GSM8K's own solutions (e.g. for few-shot-style base
models that imitate that format).

Tokenization (:func:`encode_prompts`): plain prompts get the tokenizer's special tokens (e.g. a BOS),
chat prompts do not, since the chat template writes its own.
"""
from __future__ import annotations

from typing import Mapping, Sequence

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
GSM8K_INSTRUCTION = "Please reason step by step, and write your final answer on the last line as '#### <answer>'."

TEMPLATES = ("plain", "chat")


def plain_prompt(problem: str, instruction: str = INSTRUCTION) -> str:
    """``"Question: {problem}\\n{instruction}\\nAnswer:"`` (the instruction line only when it is
    non-empty); see the module docstring."""
    lines = [f"Question: {problem.strip()}"]
    if instruction:
        lines.append(instruction)
    lines.append("Answer:")
    return "\n".join(lines)


def _tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def chat_prompt(tokenizer, problem: str, instruction: str = INSTRUCTION, system: str | None = None) -> str:
    """The problem (and instruction) as a user message, after ``system`` when given, rendered by the
    tokenizer's chat template with the generation prompt: a string to tokenize without adding
    special tokens (the template writes them)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {_tokenizer_name(tokenizer)!r} has no chat template: use template='plain' "
                         f"(or a tokenizer with a chat template, e.g. an instruction-tuned model's).")
    content = f"{problem.strip()}\n{instruction}" if instruction else problem.strip()
    messages = [{"role": "user", "content": content}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def build_prompt(record: Mapping[str, str], tokenizer=None, template: str = "plain",
                 instruction: str = INSTRUCTION, system: str | None = None) -> str:
    """The prompt text of ``record["problem"]`` in ``template`` (``"plain"`` or ``"chat"``; the
    tokenizer and ``system`` are only for ``"chat"``)."""
    if template not in TEMPLATES:
        raise ValueError(f"template={template!r} is not one of {TEMPLATES}.")
    if template == "plain" and system is not None:
        raise ValueError("system is only used by template='chat': the plain template has no system message.")
    if "problem" not in record:
        raise KeyError(f"the record has no 'problem' field (it has {sorted(record)}).")
    if template == "plain":
        return plain_prompt(record["problem"], instruction)
    if tokenizer is None:
        raise ValueError("template='chat' needs the tokenizer (its chat template renders the prompt).")
    return chat_prompt(tokenizer, record["problem"], instruction, system)


def encode_prompts(tokenizer, texts: Sequence[str], template: str = "plain") -> list[list[int]]:
    """Token ids of prompt texts rendered with ``template``: special tokens added for ``"plain"``,
    not for ``"chat"`` (the chat template already wrote them)."""
    if template not in TEMPLATES:
        raise ValueError(f"template={template!r} is not one of {TEMPLATES}.")
    return list(tokenizer(list(texts), add_special_tokens=template == "plain")["input_ids"])
