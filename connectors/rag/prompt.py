"""How a RAG prompt is laid out: `PromptTemplate`, a prefix, the passages, the question.

    prefix | passage_1 SEP passage_2 SEP ... passage_n SEP | question suffix answer_prefix

- `prefix`: what comes before the first passage (a system prompt, the chat template's header of the user
  turn). It opens every prompt, so its KV is the same in all of them: it is stored like a passage (its
  standalone KV, computed from position 0, is exactly what a full prefill computes) and never recomputed.
- each passage is followed by `separator` (computed fresh: it is where one passage meets the next);
- `question`, then `suffix` (the end of the user turn and the assistant's header), then the caller's
  `answer_prefix` (the opening words of the answer, if any) are computed fresh.
`PromptTemplate.chat(tokenizer, system=...)` cuts a tokenizer's chat template around one user message
holding the passages and the question; `plain()` is the bare `passages SEP question` layout;
`for_tokenizer(tokenizer)` is the chat template where the tokenizer has one (the default of `RagPipeline`).
"""

from __future__ import annotations

from dataclasses import dataclass

from connectors.rag.errors import RagError

_MARK = "\u0000kvstore-rag-passages\u0000"


@dataclass(frozen=True, slots=True)
class PromptTemplate:
    prefix: str = ""  # before the first passage; stored like a passage
    separator: str = "\n\n"  # after each passage
    suffix: str = ""  # after the question: the end of the user turn, the assistant's header

    def __post_init__(self) -> None:
        for name in ("prefix", "separator", "suffix"):
            if not isinstance(getattr(self, name), str):
                raise RagError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        if not self.separator:
            raise RagError("the separator must not be empty (it keeps passages apart)")

    @classmethod
    def plain(cls, separator: str = "\n\n") -> PromptTemplate:
        """`passage_1 SEP ... passage_n SEP question`: for base models without a chat template."""
        return cls("", separator, "")

    @classmethod
    def chat(cls, tokenizer, system: str | None = None, separator: str = "\n\n") -> PromptTemplate:
        """The tokenizer's chat template around one user message `passages SEP question` (after the system
        turn: `system`, or the template's own default), ending with the assistant's header."""
        if not getattr(tokenizer, "chat_template", None):
            raise RagError("the tokenizer has no chat template: use PromptTemplate.plain()")
        messages = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": _MARK}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if text.count(_MARK) != 1:
            raise RagError("the chat template does not render the user message exactly once")
        prefix, suffix = text.split(_MARK)
        return cls(prefix, separator, suffix)

    @classmethod
    def for_tokenizer(cls, tokenizer, system: str | None = None) -> PromptTemplate:
        """The chat template where the tokenizer has one, else `plain()`."""
        if getattr(tokenizer, "chat_template", None):
            return cls.chat(tokenizer, system)
        return cls.plain()

    def tail(self, question: str, answer_prefix: str = "") -> str:
        """The text after the last passage's separator: the question, the suffix, the answer's opening."""
        return question + self.suffix + answer_prefix

    def render(self, passages: list[str], question: str, answer_prefix: str = "") -> str:
        """The whole prompt as text (the pipeline tokenizes it piece by piece, see `RagPipeline.parts`)."""
        return self.prefix + "".join(p + self.separator for p in passages) + self.tail(question, answer_prefix)
