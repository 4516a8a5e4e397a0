"""Conversations over `HFConnector`: a multi-turn chat and many questions over one long document.

Both keep token ids, never re-tokenized text: a turn's prompt is the previous prompt's ids plus the
answer's ids plus the new message's ids, so every earlier chunk hashes the same and is reused.
- `ChatSession.ask(message)`: the whole conversation so far, then `message`; the answer joins the history.
- `DocumentQA.ask(question)`: the document, then `question`; questions do not see each other.
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


class DocumentQA:
    """Questions over one document; each prompt is `document + question` and reuses the document's KV."""

    def __init__(self, connector: HFConnector, tokenizer, document: str, *, max_new_tokens: int = 16,
                 stop_ids: Collection[int] | None = None) -> None:
        self.connector = connector
        self.tokenizer = tokenizer
        self.document_ids = _encode(tokenizer, document)
        self.max_new_tokens = max_new_tokens
        self.stop_ids = stop_ids

    def ask(self, question: str) -> Turn:
        prompt = np.concatenate([self.document_ids, _encode(self.tokenizer, question)])
        gen = self.connector.generate(prompt, self.max_new_tokens, self.stop_ids)
        return Turn(question, self.tokenizer.decode(gen.tokens), gen.tokens, prompt, gen.report, gen.decode_s)


class ChatSession:
    """A conversation whose every turn reuses the KV of all earlier turns (and of `context`)."""

    def __init__(self, connector: HFConnector, tokenizer, context: str = "", *, max_new_tokens: int = 16,
                 stop_ids: Collection[int] | None = None) -> None:
        self.connector = connector
        self.tokenizer = tokenizer
        self.history_ids = _encode(tokenizer, context) if context else np.empty(0, dtype=np.uint32)
        self.max_new_tokens = max_new_tokens
        self.stop_ids = stop_ids
        self.turns: list[Turn] = []

    def ask(self, message: str) -> Turn:
        prompt = np.concatenate([self.history_ids, _encode(self.tokenizer, message)])
        gen = self.connector.generate(prompt, self.max_new_tokens, self.stop_ids)
        turn = Turn(message, self.tokenizer.decode(gen.tokens), gen.tokens, prompt, gen.report, gen.decode_s)
        self.history_ids = np.concatenate([prompt, np.asarray(gen.tokens, dtype=np.uint32)])
        self.turns.append(turn)
        return turn
