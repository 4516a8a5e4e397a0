"""Conversations over `HFConnector`: a multi-turn chat and many questions over one long document.

Both keep token ids, never re-tokenized text: a turn's prompt is the previous prompt's ids plus the
answer's ids plus the new message's ids, so every earlier chunk hashes the same and is reused.
- `ChatSession.ask(message)`: the whole conversation so far, then `message`; the answer joins the history.
- `DocumentQA.ask(question)`: the document, then `question`; questions do not see each other.
With a tokenizer that has a chat template (instruct models) the prompts are the template's (system turn,
role headers, end-of-turn markers); each new piece of template text is tokenized on its own and appended
(`TemplatePrompt`), so the ids of what came before never change. Without a template the text is joined
as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

import numpy as np

from connectors.hf.loader import HFConnector, LoadReport


@dataclass(slots=True)
class Turn:
    message: str
    answer: str
    answer_ids: list[int]
    prompt_ids: np.ndarray  # [T] uint32: what the model saw
    report: LoadReport
    decode_s: float


def _encode(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.uint32)


def _uses_template(tokenizer, chat_template: bool | None) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat_template and not has:
        raise ValueError("chat_template=True, but the tokenizer has no chat template")
    return has if chat_template is None else chat_template


class TemplatePrompt:
    """A conversation rendered by the tokenizer's chat template, as token ids that only ever grow.

    `extend(messages, generation_prompt)` renders the whole conversation and tokenizes only the text
    beyond what was rendered before. Templates in use (ChatML, Llama 3, ...) render a conversation as a
    prefix of its continuation; where one does not, the conversation is tokenized anew (correct, but
    earlier chunks are then not reused)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.text = ""
        self.ids = np.empty(0, dtype=np.uint32)

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def extend(self, messages: list[dict], generation_prompt: bool) -> np.ndarray:
        text = self.render(messages, generation_prompt)
        if text.startswith(self.text):
            self.ids = np.concatenate([self.ids, _encode(self.tokenizer, text[len(self.text):])])
        else:
            self.ids = _encode(self.tokenizer, text)
        self.text = text
        return self.ids

    def add_answer(self, answer_ids: list[int]) -> None:
        """Append the generated ids as they are (the model's own end-of-turn token included)."""
        self.ids = np.concatenate([self.ids, np.asarray(answer_ids, dtype=np.uint32)])
        self.text += self.tokenizer.decode(answer_ids, skip_special_tokens=False)


def _answer_text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


class DocumentQA:
    """Questions over one document; each prompt is `document + question` and reuses the document's KV.

    With a chat template the document and the question are one user message (`document`, a blank line,
    `question`), after the template's system turn; the ids up to the end of the document are the same
    for every question."""

    def __init__(self, connector: HFConnector, tokenizer, document: str, *, max_new_tokens: int = 16,
                 stop_ids: Collection[int] | None = None, chat_template: bool | None = None,
                 system: str | None = None) -> None:
        self.connector = connector
        self.tokenizer = tokenizer
        self.document = document
        self.max_new_tokens = max_new_tokens
        self.stop_ids = stop_ids
        self.system = system
        self.chat = _uses_template(tokenizer, chat_template)
        self.document_ids = None if self.chat else _encode(tokenizer, document)
        self._head = ""  # with a template: the rendered text up to the end of the document

    def prompt_ids(self, question: str) -> np.ndarray:
        if not self.chat:
            return np.concatenate([self.document_ids, _encode(self.tokenizer, question)])
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + \
            [{"role": "user", "content": f"{self.document}\n\n{question}"}]
        text = TemplatePrompt(self.tokenizer).render(messages, True)
        cut = text.index(self.document) + len(self.document)
        if self.document_ids is None or text[:cut] != self._head:
            self._head, self.document_ids = text[:cut], _encode(self.tokenizer, text[:cut])
        return np.concatenate([self.document_ids, _encode(self.tokenizer, text[cut:])])

    def ask(self, question: str) -> Turn:
        prompt = self.prompt_ids(question)
        gen = self.connector.generate(prompt, self.max_new_tokens, self.stop_ids)
        return Turn(question, _answer_text(self.tokenizer, gen.tokens), gen.tokens, prompt, gen.report, gen.decode_s)


class ChatSession:
    """A conversation whose every turn reuses the KV of all earlier turns (and of `context`).

    With a chat template, `context` opens the first user message (then a blank line and the message) and
    `system` is the system turn (the template's default where it has one and `system` is None)."""

    def __init__(self, connector: HFConnector, tokenizer, context: str = "", *, max_new_tokens: int = 16,
                 stop_ids: Collection[int] | None = None, chat_template: bool | None = None,
                 system: str | None = None) -> None:
        self.connector = connector
        self.tokenizer = tokenizer
        self.context = context
        self.max_new_tokens = max_new_tokens
        self.stop_ids = stop_ids
        self.chat = _uses_template(tokenizer, chat_template)
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self._template = TemplatePrompt(tokenizer) if self.chat else None
        self.history_ids = _encode(tokenizer, context) if context and not self.chat else np.empty(0, dtype=np.uint32)
        self.turns: list[Turn] = []

    def ask(self, message: str) -> Turn:
        if self.chat:
            content = f"{self.context}\n\n{message}" if self.context and not self.turns else message
            self.messages.append({"role": "user", "content": content})
            prompt = self._template.extend(self.messages, generation_prompt=True).copy()
        else:
            prompt = np.concatenate([self.history_ids, _encode(self.tokenizer, message)])
        gen = self.connector.generate(prompt, self.max_new_tokens, self.stop_ids)
        turn = Turn(message, _answer_text(self.tokenizer, gen.tokens), gen.tokens, prompt, gen.report, gen.decode_s)
        if self.chat:
            self.messages.append({"role": "assistant", "content": turn.answer})
            self._template.add_answer(gen.tokens)
            self.history_ids = self._template.ids
        else:
            self.history_ids = np.concatenate([prompt, np.asarray(gen.tokens, dtype=np.uint32)])
        self.turns.append(turn)
        return turn
