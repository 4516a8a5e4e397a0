"""Offline training text for the shipped tiny model.

Owns two sources, both deterministic and available without a network:

* ``harvest_text``: docstrings and comments of the installed Python packages (site-packages and the
  standard library), read with ``ast``/``tokenize`` in sorted file order. Files are split into a
  training and a held-out share by a CRC of their relative path, never at random.
* the retrieval world: made-up people, cities and countries (``make_world``), passages of facts about
  them (``person_passage``, ``city_passage``), and questions whose answers need one passage (1 hop)
  or two passages combined (2 hops) (``make_questions``). Names come from one syllable generator and
  are split into a training and a held-out pool by a CRC of the name, so the two pools are disjoint.

The question format is a cloze, fixed and exactly matchable::

    Q: Where was Zorbin Kelt born?
    A: Zorbin Kelt was born in| Varnhold.
    Q: In which country was Zorbin Kelt born?
    A: Zorbin Kelt was born in| Varnhold. The city of Varnhold lies in Eskaria.

``|`` marks where the prompt ends and the ``target`` (what greedy decoding must produce) starts;
``answer`` is the final entity (" Varnhold", " Eskaria"). The answer sentence repeats the passage
sentence word for word, so answering means finding the right passage and copying from it.
"""

from __future__ import annotations

import ast
import io
import os
import random
import sys
import sysconfig
import tokenize
import zlib
from dataclasses import dataclass
from pathlib import Path

# ----------------------------------------------------------------------------- text harvest


def _docs_and_comments(source: str) -> list[str]:
    """Docstrings (module, class, function) and runs of comment lines of one source file."""
    out: list[str] = []
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return out
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 40:
                out.append(doc)
    run: list[str] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                text = tok.string.lstrip("#").strip()
                if text and not text.startswith(("!", "-*-", "type:", "noqa", "pragma", "pylint")):
                    run.append(text)
                    continue
            if tok.type in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                continue
            if len(run) >= 2 or (run and len(run[0]) >= 60):
                out.append("\n".join(run))
            run = []
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return out


def python_roots() -> list[Path]:
    """Directories whose ``.py`` files are harvested: site-packages (purelib, platlib) and stdlib."""
    paths = sysconfig.get_paths()
    roots = []
    for key in ("purelib", "platlib", "stdlib"):
        p = Path(paths[key]).resolve()
        if p.is_dir() and p not in roots:
            roots.append(p)
    return roots


def harvest_text(max_chars: int, heldout: bool, heldout_mod: int = 20, groups_cap: int = 40) -> list[str]:
    """Docstrings and comments of installed packages, up to ``max_chars``, in a fixed order.

    Files are grouped by top-level package (one group for the loose stdlib modules); each group
    gives at most ``max_chars // groups_cap`` characters, so a few huge, repetitive packages (AWS API
    docs, say) cannot crowd out the rest. ``heldout=False`` takes files with
    ``crc32(relative path) % heldout_mod != 0``; ``heldout=True`` takes the others. Groups and files
    are read in sorted order, so two runs on the same installation read the same text.
    """
    groups: dict[str, list[tuple[str, Path]]] = {}
    for root in python_roots():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "test", "tests", "site-packages"))
            for f in sorted(filenames):
                if not f.endswith(".py"):
                    continue
                path = Path(dirpath) / f
                rel = path.relative_to(root).as_posix()
                group = f"{root.name}/{rel.split('/')[0] if '/' in rel else '_modules'}"
                groups.setdefault(group, []).append((f"{root.name}/{rel}", path))
    per_group = max(1, max_chars // groups_cap)
    texts: list[str] = []
    total = 0
    for group in sorted(groups):
        got = 0
        for rel, path in groups[group]:
            if (zlib.crc32(rel.encode()) % heldout_mod == 0) != heldout:
                continue
            try:
                if path.stat().st_size > 400_000:
                    continue
                source = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            for t in _docs_and_comments(source):
                texts.append(t)
                got += len(t)
            if got >= per_group:
                break
        total += got
        if total >= max_chars:
            break
    return texts


# ----------------------------------------------------------------------------- retrieval world

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "pr", "r", "s",
           "st", "t", "th", "tr", "v", "w", "z", "sh", "ch", "j", "qu"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "y"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "k", "x", "nd", "rt"]
_CITY_SUFFIX = ["hold", "mere", "ford", "wick", "haven", "burg", "stead", "port", "dale", "gate"]
_COUNTRY_SUFFIX = ["ia", "land", "ora", "esh", "istan", "avia", "ene", "und"]

PROFESSIONS = ["baker", "sailor", "painter", "doctor", "farmer", "teacher", "miner", "weaver",
               "lawyer", "potter", "pilot", "singer", "tailor", "guard", "clerk", "nurse", "chemist",
               "builder", "fisher", "poet", "judge", "banker", "cook", "smith"]

_FILLER_PERSON = [
    "{n} enjoys long walks along the river in the early morning.",
    "Friends describe {n} as patient, curious and a little stubborn.",
    "As a child, {n} spent most summers reading old maps.",
    "{n} keeps a small garden with beans, onions and a single apple tree.",
    "In later years {n} wrote letters to many distant relatives.",
    "{n} once walked across the northern hills in nine days.",
    "Few people know that {n} collects painted stones.",
    "{n} speaks three languages and is learning a fourth.",
    "Every winter {n} repairs the fences around the old farm.",
    "{n} prefers tea to coffee and rarely eats before noon.",
    "Neighbours often ask {n} for advice about the weather.",
    "{n} has two brothers and one sister, all older.",
    "On weekends {n} plays chess at the public library.",
    "{n} moved house four times before the age of twenty.",
    "The local newspaper once printed a short story by {n}.",
    "{n} dislikes loud music but loves the sound of rain.",
]
_FILLER_CITY = [
    "{c} is known for its busy markets and narrow streets.",
    "A wide river runs through the centre of {c}.",
    "Every spring {c} holds a festival of lanterns.",
    "The old bridge of {c} was rebuilt after a great flood.",
    "Most people in {c} travel by bicycle or by boat.",
    "The harbour of {c} freezes in the coldest winters.",
    "Visitors to {c} often climb the hill behind the old tower.",
    "{c} has a small university and three public libraries.",
    "The oldest house in {c} is said to be six hundred years old.",
    "In summer the parks of {c} fill with musicians and street cooks.",
    "Trains from {c} leave for the coast twice a day.",
    "The people of {c} are proud of their bread and their cheese.",
    "A tall clock stands in the main square of {c}.",
    "Storms sometimes close the mountain road that leads to {c}.",
    "Many artists moved to {c} because the rents were low.",
    "The museum of {c} keeps a large collection of old coins.",
]


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    profession: str


@dataclass(frozen=True)
class World:
    """One prompt's worth of entities: people, their cities, and each city's country."""

    people: tuple[Person, ...]
    city_country: tuple[tuple[str, str], ...]

    def country_of(self, city: str) -> str:
        return dict(self.city_country)[city]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def _in_pool(name: str, heldout: bool) -> bool:
    """Disjoint pools: a name is held-out iff crc32(name) % 8 == 0."""
    return (zlib.crc32(name.encode()) % 8 == 0) == heldout


def _name(rng: random.Random, kind: str, heldout: bool) -> str:
    while True:
        if kind == "person":
            n = f"{_word(rng, rng.randint(1, 2)).capitalize()} {_word(rng, rng.randint(1, 2)).capitalize()}"
        elif kind == "city":
            n = (_word(rng, 1) + rng.choice(_CITY_SUFFIX)).capitalize()
        else:
            n = (_word(rng, rng.randint(1, 2)) + rng.choice(_COUNTRY_SUFFIX)).capitalize()
        if _in_pool(n, heldout):
            return n


def make_world(rng: random.Random, n_people: int, n_cities: int, heldout: bool) -> World:
    """``n_people`` distinct people spread over ``n_cities`` distinct cities (each with a country)."""
    cities: list[str] = []
    while len(cities) < n_cities:
        c = _name(rng, "city", heldout)
        if c not in cities:
            cities.append(c)
    countries: list[str] = []
    while len(countries) < max(2, n_cities - 1):
        k = _name(rng, "country", heldout)
        if k not in countries:
            countries.append(k)
    city_country = tuple((c, countries[i % len(countries)]) for i, c in enumerate(cities))
    names: list[str] = []
    while len(names) < n_people:
        n = _name(rng, "person", heldout)
        if n not in names and all(n.split()[0] != m.split()[0] for m in names):
            names.append(n)
    people = tuple(Person(n, cities[i % n_cities] if i < n_cities else rng.choice(cities),
                          rng.choice(PROFESSIONS)) for i, n in enumerate(names))
    return World(people, city_country)


def person_facts(p: Person) -> list[str]:
    return [f"{p.name} was born in {p.city}.", f"{p.name} works as a {p.profession}."]


def city_facts(city: str, country: str) -> list[str]:
    return [f"The city of {city} lies in {country}."]


def person_passage(rng: random.Random, people: list[Person], n_filler: int) -> str:
    """Facts about each of ``people`` (1 or 2) among ``n_filler`` neutral sentences per person."""
    out: list[str] = []
    for p in people:
        sents = [t.format(n=p.name) for t in rng.sample(_FILLER_PERSON, min(n_filler, len(_FILLER_PERSON)))]
        for f in person_facts(p):
            sents.insert(rng.randint(0, len(sents)), f)
        out += sents
    return " ".join(out)


def city_passage(rng: random.Random, city: str, country: str, n_filler: int) -> str:
    sents = [t.format(c=city) for t in rng.sample(_FILLER_CITY, min(n_filler, len(_FILLER_CITY)))]
    for f in city_facts(city, country):
        sents.insert(rng.randint(0, len(sents)), f)
    return " ".join(sents)


@dataclass(frozen=True)
class Question:
    """``prompt_tail`` ends right before ``target``; ``answer`` is the final entity, with its space."""

    question: str
    prompt_tail: str
    target: str
    answer: str
    hops: int
    relation: str


def make_question(p: Person, world: World, relation: str) -> Question:
    if relation == "born":
        q = f"Where was {p.name} born?"
        return Question(q, f"Q: {q}\nA: {p.name} was born in", f" {p.city}.", f" {p.city}", 1, relation)
    if relation == "profession":
        q = f"What does {p.name} work as?"
        return Question(q, f"Q: {q}\nA: {p.name} works as a", f" {p.profession}.", f" {p.profession}", 1,
                        relation)
    if relation == "country":
        country = world.country_of(p.city)
        q = f"In which country was {p.name} born?"
        return Question(q, f"Q: {q}\nA: {p.name} was born in",
                        f" {p.city}. The city of {p.city} lies in {country}.", f" {country}", 2, relation)
    if relation == "city_country":
        country = world.country_of(p.city)
        q = f"In which country is {p.city}?"
        return Question(q, f"Q: {q}\nA: The city of {p.city} lies in", f" {country}.", f" {country}", 1,
                        relation)
    raise ValueError(f"unknown relation {relation!r}")


RELATIONS_1HOP = ("born", "profession", "city_country")


def candidate_targets(world: World, q: Question) -> tuple[str, ...]:
    """Every target of the question's form that the prompt makes plausible, sorted; one is ``q.target``.

    1 hop: one per distinct value of the relation stated in the prompt. 2 hops: the full chain
    through each distinct birth city, so choosing the right chain needs the first hop.
    """
    if q.relation == "born":
        return tuple(sorted({f" {p.city}." for p in world.people}))
    if q.relation == "profession":
        return tuple(sorted({f" {p.profession}." for p in world.people}))
    if q.relation == "city_country":
        return tuple(sorted({f" {k}." for _, k in world.city_country}))
    return tuple(sorted({f" {p.city}. The city of {p.city} lies in {world.country_of(p.city)}."
                         for p in world.people}))


def chance_level(world: World, q: Question) -> float:
    """1 / number of distinct candidates of the answer's type stated in the prompt."""
    if q.relation == "born":
        return 1.0 / len({p.city for p in world.people})
    if q.relation == "profession":
        return 1.0 / len({p.profession for p in world.people})
    return 1.0 / len({k for _, k in world.city_country})


def person_groups(rng: random.Random, world: World, max_passages: int = 8) -> list[list[Person]]:
    """People split into passages of 1-2 people, so that people + city passages <= ``max_passages``."""
    people = list(world.people)
    n_pass = max((len(people) + 1) // 2, min(len(people), max_passages - len(world.city_country)))
    n_pairs = len(people) - n_pass
    groups, i = [], 0
    for g in range(n_pass):
        size = 2 if g < n_pairs else 1
        groups.append(people[i:i + size])
        i += size
    return groups


def rag_document(rng: random.Random, world: World, n_filler: tuple[int, int]) -> list[str]:
    """Passages of a world in random order: people in groups of 1-2, one passage per city."""
    passages = [person_passage(rng, g, rng.randint(*n_filler)) for g in person_groups(rng, world)]
    passages += [city_passage(rng, c, k, rng.randint(*n_filler)) for c, k in world.city_country]
    rng.shuffle(passages)
    return passages


def qa_text(rng: random.Random, world: World, n_questions: int, p_two_hop: float) -> list[Question]:
    qs = []
    for _ in range(n_questions):
        p = rng.choice(world.people)
        rel = "country" if rng.random() < p_two_hop else rng.choice(RELATIONS_1HOP)
        qs.append(make_question(p, world, rel))
    return qs


def fact_training_doc(rng: random.Random, short: bool) -> tuple[str, list[Question]]:
    """One training document: passages (``short``: a bare shuffled fact list) and its questions.

    ``short`` fits 256-512 tokens; otherwise 4-8 passages with filler, as in the RAG evaluation.
    """
    if short:
        world = make_world(rng, rng.randint(3, 8), rng.randint(2, 5), heldout=False)
        facts = [f for p in world.people for f in person_facts(p)]
        facts += [f for c, k in world.city_country for f in city_facts(c, k)]
        rng.shuffle(facts)
        return " ".join(facts), qa_text(rng, world, rng.randint(3, 5), p_two_hop=0.25)
    world = make_world(rng, rng.randint(3, 6), rng.randint(2, 4), heldout=False)
    body = "\n\n".join(rag_document(rng, world, (1, 6)))
    return body, qa_text(rng, world, rng.randint(3, 6), p_two_hop=0.3)


def fact_training_text(rng: random.Random, short: bool) -> str:
    """``fact_training_doc`` as plain text: body, a blank line, one ``Q:``/``A:`` pair per question."""
    body, qs = fact_training_doc(rng, short)
    return body + "\n\n" + "\n".join(q.prompt_tail + q.target for q in qs) + "\n"


def main() -> None:  # pragma: no cover - manual look at the generated text
    rng = random.Random(0)
    print(fact_training_text(rng, short=True))
    print("-----")
    print(fact_training_text(rng, short=False))
    t = harvest_text(200_000, heldout=False)
    print(len(t), sum(map(len, t)), file=sys.stderr)


if __name__ == "__main__":
    main()
