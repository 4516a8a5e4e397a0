"""Held-out multi-passage questions for an instruct model (SmolLM2-135M-Instruct), in two splits.

Each example: 4-6 passages of 150-250 tokens, one per made-up person (names from the held-out pool of
`corpus`, never trained on by the tiny model, meaningless to any model), each stating four facts about
that person among neutral filler sentences: their profession, the instrument they play, their pet and their
favourite colour.
The answers are common English words, so a 135M model that finds the right passage can say them (it
mangles made-up names when it has to copy them: the tiny model's cloze set `evalset` is too hard for it
through a chat template). Every person in a prompt has different values, so the question's answer is in
exactly one passage, and the other passages hold answers of the same type (chance = 1 / people).
Prompts are ~650-1,100 tokens with SmolLM2's tokenizer (chat template included). Full prefill answers
about two thirds of them (chance ~0.2), often with little confidence: the model is small.

Two splits, generated deterministically from their seeds:
- `eval` (`heldout/rag_chat.jsonl`, 150 examples, seed 20260516): what `benchmarks.blend_bench` reports;
- `dev` (`heldout/rag_chat_dev.jsonl`, 60 examples, seed 20260517): the only split blend's settings were
  chosen on.
An example is asked through the model's chat template: one user message holding the passages and the
question, then the assistant's answer opening (`lead`, "Pra Naxzok works as a"); `answer` (" banker")
continues it.

    python -m benchmarks.models.chatset --write    # regenerate both files (SmolLM2's tokenizer)
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.models import corpus
from benchmarks.models.evalset import HELDOUT_DIR

SPLITS = {"eval": ("rag_chat.jsonl", 20260516, 150), "dev": ("rag_chat_dev.jsonl", 20260517, 60)}
MAX_PROMPT_TOKENS = 1000

ATTRIBUTES = {  # relation -> (values, fact, question, lead)
    "profession": (corpus.PROFESSIONS, "{n} works as a {v}.", "What does {n} work as?", "{n} works as a"),
    "instrument": (["piano", "violin", "guitar", "drum", "flute", "harp", "trumpet", "cello", "organ", "banjo"],
                   "{n} plays the {v}.", "Which instrument does {n} play?", "{n} plays the"),
    "pet": (["dog", "cat", "horse", "parrot", "rabbit", "goat", "duck", "owl", "pig", "sheep"],
            "{n} keeps a {v} as a pet.", "What pet does {n} keep?", "{n} keeps a"),
    "colour": (["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "brown", "pink"],
               "The favourite colour of {n} is {v}.", "What is the favourite colour of {n}?",
               "The favourite colour of {n} is"),
}


@dataclass(frozen=True)
class ChatExample:
    id: int
    passages: tuple[str, ...]
    question: str
    lead: str  # the assistant's answer opening
    answer: str  # continues `lead`, with its leading space: " banker"
    relation: str
    chance: float  # 1 / people in the prompt (each holds one answer of the type)


def _ntok(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


PEOPLE = (4, 6)
MIN_PASSAGE_TOKENS = 150


def _passage(rng: random.Random, name: str, facts: list[str], tokenizer) -> str:
    """The facts among filler sentences; at least MIN_PASSAGE_TOKENS tokens."""
    filler = rng.sample(corpus._FILLER_PERSON, len(corpus._FILLER_PERSON))
    for n in range(2, len(filler) + 1):
        sents = [f.format(n=name) for f in filler[:n]]
        for f in facts:
            sents.insert(rng.randint(0, len(sents)), f)
        text = " ".join(sents)
        if _ntok(tokenizer, text) >= MIN_PASSAGE_TOKENS:
            return text
    return text


def build_examples(tokenizer, n: int, seed: int) -> list[ChatExample]:
    rng = random.Random(seed)
    relations = [list(ATTRIBUTES)[i % len(ATTRIBUTES)] for i in range(n)]
    rng.shuffle(relations)
    out: list[ChatExample] = []
    for relation in relations:
        while True:
            people = rng.randint(*PEOPLE)
            names: list[str] = []
            while len(names) < people:
                name = corpus._name(rng, "person", heldout=True)
                if all(name.split()[0] != m.split()[0] and name.split()[1] != m.split()[1] for m in names):
                    names.append(name)
            values = {a: rng.sample(spec[0], people) for a, spec in ATTRIBUTES.items()}
            passages = [_passage(rng, name, [ATTRIBUTES[a][1].format(n=name, v=values[a][i]) for a in ATTRIBUTES],
                                 tokenizer) for i, name in enumerate(names)]
            who = rng.randrange(people)
            _, _, question, lead = ATTRIBUTES[relation]
            order = list(range(people))
            rng.shuffle(order)
            ex = ChatExample(len(out), tuple(passages[i] for i in order), question.format(n=names[who]),
                             lead.format(n=names[who]), " " + values[relation][who], relation, 1.0 / people)
            if _ntok(tokenizer, "\n\n".join(ex.passages) + "\n\n" + ex.question) <= MAX_PROMPT_TOKENS:
                out.append(ex)
                break
    return out


def write_splits(tokenizer, out_dir: Path = HELDOUT_DIR) -> None:
    for file, seed, n in SPLITS.values():
        with open(out_dir / file, "w") as f:
            f.writelines(json.dumps(asdict(ex)) + "\n" for ex in build_examples(tokenizer, n, seed))


def load_chat(split: str = "eval") -> list[ChatExample]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    with open(HELDOUT_DIR / SPLITS[split][0]) as f:
        rows = [json.loads(line) for line in f]
    return [ChatExample(**{**r, "passages": tuple(r["passages"])}) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="regenerate the split files with SmolLM2's tokenizer")
    args = ap.parse_args()
    if args.write:
        from transformers import AutoTokenizer

        from connectors.models import model_path

        write_splits(AutoTokenizer.from_pretrained(model_path("smollm2-135m")))
    for name in SPLITS:
        exs = load_chat(name)
        print(name, len(exs), {r: sum(e.relation == r for e in exs) for r in ATTRIBUTES})


if __name__ == "__main__":
    main()
