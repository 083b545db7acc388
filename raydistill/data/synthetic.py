"""The built-in offline corpus: English-like text generated in code from a seeded "world".

A :class:`World` (one per seed) holds people, organisations and places with fixed attributes: each person
always lives in the same city, works for the same organisation, has one profession and nationality and
owns one object of a fixed size and colour; each organisation has one field and one home city. Every
sentence the generator writes about them states those facts, so a model trained on the corpus can learn
them, and the grammar has real structure (subject-verb agreement across attractor phrases, relative
clauses and "that"-complements) for it to learn too.

The same sentence generator yields annotations (entity spans, agreement pairs, stated facts), from which
the downstream tasks are derived in the schemas of the real benchmarks:

* :func:`sentence_classification_examples` - CoLA-like acceptability (``{"sentence", "label"}``; label 0
  when one verb was put in the wrong number),
* :func:`ner_examples` - CoNLL-2003-like (``{"tokens", "ner_tags"}``, IOB2 tags of PER/ORG/LOC/MISC),
* :func:`qa_examples` - SQuAD-like (``{"id", "title", "context", "question", "answers"}``).

Train and dev examples are told apart by a hash of their text, so the splits never share an example
whatever sizes are asked for.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

# ----------------------------------------------------------------------------------------------- lexicon

_FIRST_NAMES = (
    "Alice", "Bruno", "Chen", "Dalia", "Emeka", "Fatima", "Gustav", "Hana", "Ivan", "Julia", "Kofi", "Lena",
    "Mateo", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Samir", "Tara", "Umar", "Vera", "Wei", "Ximena",
    "Yusuf", "Zoe", "Anton", "Beatriz", "Carlos", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ingrid",
    "Jonas", "Kira", "Luis", "Maya", "Nils", "Olga", "Pablo", "Rania", "Sven", "Tomas", "Uma", "Viktor",
    "Wanda", "Yara", "Zane",
)
_LAST_NAMES = (
    "Smith", "Okafor", "Tanaka", "Novak", "Garcia", "Haddad", "Larsen", "Kowalski", "Moreau", "Rossi",
    "Mensah", "Ivanova", "Fischer", "Nakamura", "Silva", "Patel", "Dubois", "Jensen", "Costa", "Weber",
    "Kim", "Mendes", "Berg", "Lindqvist", "Adeyemi", "Schulz", "Romero", "Popescu", "Hansen", "Varga",
    "Nowak", "Petrov", "Alvarez", "Bauer", "Kaur", "Morales", "Ortiz", "Yilmaz", "Zhou", "Quinn",
)
_ORG_PREFIXES = (
    "Northwind", "Bluefield", "Granite", "Silverline", "Redwood", "Sunpeak", "Ironbridge", "Clearwater",
    "Brightstone", "Oakridge", "Lumen", "Vantage", "Harbor", "Summit", "Crescent", "Polar", "Evergreen",
    "Falcon", "Meridian", "Cobalt", "Aurora", "Pioneer", "Keystone", "Riverside",
)
_ORG_SUFFIXES = ("Labs", "Systems", "Group", "Industries", "Bank", "Motors", "Media", "Health", "Foods",
                 "Energy", "Logistics", "Press")
_FIELDS = ("robotics", "banking", "medicine", "shipping", "software", "farming", "energy", "publishing",
           "aviation", "mining", "textiles", "insurance")
# (city, country, demonym); some cities span two tokens so NER sees I- tags.
_PLACES = (
    ("Oslo", "Norway", "Norwegian"), ("Bergen", "Norway", "Norwegian"), ("Lyon", "France", "French"),
    ("Paris", "France", "French"), ("Osaka", "Japan", "Japanese"), ("Kyoto", "Japan", "Japanese"),
    ("Lagos", "Nigeria", "Nigerian"), ("Abuja", "Nigeria", "Nigerian"), ("Lima", "Peru", "Peruvian"),
    ("Cusco", "Peru", "Peruvian"), ("Porto", "Portugal", "Portuguese"), ("Lisbon", "Portugal", "Portuguese"),
    ("Krakow", "Poland", "Polish"), ("Gdansk", "Poland", "Polish"), ("Accra", "Ghana", "Ghanaian"),
    ("Kumasi", "Ghana", "Ghanaian"), ("Munich", "Germany", "German"), ("Hamburg", "Germany", "German"),
    ("Mumbai", "India", "Indian"), ("New Delhi", "India", "Indian"), ("Toronto", "Canada", "Canadian"),
    ("Quebec City", "Canada", "Canadian"), ("Buenos Aires", "Argentina", "Argentine"),
    ("Cordoba", "Argentina", "Argentine"), ("Seoul", "South Korea", "Korean"),
    ("Busan", "South Korea", "Korean"), ("Cape Town", "South Africa", "South African"),
    ("Durban", "South Africa", "South African"), ("Izmir", "Turkey", "Turkish"), ("Ankara", "Turkey", "Turkish"),
)
_PROFESSIONS = ("engineer", "doctor", "teacher", "lawyer", "farmer", "pilot", "writer", "nurse", "chef",
                "artist", "baker", "singer", "painter", "student", "driver", "manager")
_THINGS = ("table", "window", "garden", "bridge", "house", "tower", "station", "river", "market", "lamp",
           "door", "school", "shop", "bench")
_PREPOSITIONS = ("near", "behind", "beside", "under", "next to", "across from")
_ADJECTIVES = ("tired", "happy", "busy", "late", "ready", "famous", "quiet", "angry", "calm", "proud")
_COLOURS = ("red", "blue", "green", "yellow", "black", "white", "purple", "orange", "grey", "brown")
_SIZES = ("small", "large", "tiny", "huge", "medium-sized")
_ITEMS = ("car", "bicycle", "boat", "kite", "guitar", "umbrella", "backpack", "lamp", "scooter", "piano")
# (singular, plural) verb forms: every singular form is the plural one plus "s", except be/have.
_INTRANSITIVE = (("sleeps", "sleep"), ("laughs", "laugh"), ("waits", "wait"), ("smiles", "smile"),
                 ("works", "work"), ("sings", "sing"))
_TRANSITIVE = (("admires", "admire"), ("visits", "visit"), ("helps", "help"), ("knows", "know"),
               ("likes", "like"), ("trusts", "trust"), ("meets", "meet"), ("calls", "call"))
_SAYING = (("says", "say"), ("believes", "believe"), ("thinks", "think"), ("knows", "know"),
           ("hopes", "hope"), ("reports", "report"))
BE = ("is", "are")
LIVE = ("lives", "live")
WORK = ("works", "work")
OWN = ("owns", "own")
SPEAK = ("speaks", "speak")

#: Every (singular, plural) verb pair the generator uses; the acceptability task flips between them.
VERB_FORMS: tuple[tuple[str, str], ...] = tuple(dict.fromkeys(
    _INTRANSITIVE + _TRANSITIVE + _SAYING + (BE, LIVE, WORK, OWN, SPEAK)))
_FLIP = {s: p for s, p in VERB_FORMS} | {p: s for s, p in VERB_FORMS}

ENTITY_TYPES = ("PER", "ORG", "LOC", "MISC")
SPLITS = ("train", "dev")

# ------------------------------------------------------------------------------------------------- world


@dataclass(frozen=True)
class Place:
    city: str
    country: str
    demonym: str


@dataclass(frozen=True)
class Organisation:
    name: str
    field: str
    city: str


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    employer: str
    profession: str
    nationality: str  # a demonym (MISC entity)
    item: str
    item_colour: str
    item_size: str


@dataclass
class World:
    """The fixed facts of one seed; every generator of that seed states only these facts."""

    seed: int
    places: tuple[Place, ...]
    organisations: tuple[Organisation, ...]
    persons: tuple[Person, ...]
    place_of: dict[str, Place] = field(default_factory=dict)
    organisation_of: dict[str, Organisation] = field(default_factory=dict)
    person_of: dict[str, Person] = field(default_factory=dict)
    residents: dict[str, tuple[Person, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.place_of = {p.city: p for p in self.places}
        self.organisation_of = {o.name: o for o in self.organisations}
        self.person_of = {p.name: p for p in self.persons}
        by_city: dict[str, list[Person]] = {}
        for person in self.persons:
            by_city.setdefault(person.city, []).append(person)
        self.residents = {city: tuple(people) for city, people in by_city.items()}


@lru_cache(maxsize=16)
def build_world(seed: int = 0, num_persons: int = 120, num_organisations: int = 24) -> World:
    """The world of ``seed``: who lives where, works for whom and owns what (cached, it is immutable)."""
    rng = random.Random(seed * 7919 + 17)
    places = tuple(Place(*p) for p in _PLACES)
    org_names = rng.sample([f"{a} {b}" for a in _ORG_PREFIXES for b in _ORG_SUFFIXES], num_organisations)
    organisations = tuple(Organisation(name, rng.choice(_FIELDS), rng.choice(places).city) for name in org_names)
    names = rng.sample([f"{a} {b}" for a in _FIRST_NAMES for b in _LAST_NAMES], num_persons)
    persons = []
    for name in names:
        home = rng.choice(places)
        # Nationality mostly matches the home country, as it would in news text, but not always.
        nationality = home.demonym if rng.random() < 0.7 else rng.choice(places).demonym
        persons.append(Person(name, home.city, rng.choice(organisations).name, rng.choice(_PROFESSIONS),
                              nationality, rng.choice(_ITEMS), rng.choice(_COLOURS), rng.choice(_SIZES)))
    return World(seed, places, organisations, tuple(persons))


# --------------------------------------------------------------------------------------------- sentences


@dataclass
class Sentence:
    """One generated sentence and what the generator knows about it.

    ``entities``: (start, end, type) token spans, end exclusive. ``agreements``: (subject head index, verb
    index, plural) for every finite verb. ``facts``: (kind, subject, start, end) token spans stating a
    world fact, e.g. ("city", "Alice Smith", 4, 5) for "Alice Smith lives in Oslo".
    """

    tokens: list[str]
    entities: list[tuple[int, int, str]]
    agreements: list[tuple[int, int, bool]]
    facts: list[tuple[str, str, int, int]]

    @property
    def text(self) -> str:
        return detokenize(self.tokens)


_NO_SPACE_BEFORE = frozenset({".", ",", "?", "'s"})


def detokenize(tokens: list[str]) -> str:
    """Join tokens as plain text: no space before punctuation and the possessive "'s"."""
    return " ".join(tokens).replace(" .", ".").replace(" ,", ",").replace(" ?", "?").replace(" 's", "'s")


def token_offsets(tokens: list[str]) -> list[int]:
    """Character offset of each token in ``detokenize(tokens)``."""
    offsets, pos = [], 0
    for i, tok in enumerate(tokens):
        if i and tok not in _NO_SPACE_BEFORE:
            pos += 1
        offsets.append(pos)
        pos += len(tok)
    return offsets


class _Builder:
    """Accumulates one sentence's tokens and annotations."""

    __slots__ = ("toks", "ents", "agrs", "facts")

    def __init__(self) -> None:
        self.toks: list[str] = []
        self.ents: list[tuple[int, int, str]] = []
        self.agrs: list[tuple[int, int, bool]] = []
        self.facts: list[tuple[str, str, int, int]] = []

    def entity(self, name: str, kind: str) -> tuple[int, int]:
        start = len(self.toks)
        self.toks.extend(name.split(" "))
        self.ents.append((start, len(self.toks), kind))
        return start, len(self.toks)

    def verb(self, forms: tuple[str, str], head: int, plural: bool) -> None:
        self.agrs.append((head, len(self.toks), plural))
        self.toks.append(forms[plural])

    def fact(self, kind: str, subject: str, span: tuple[int, int]) -> None:
        self.facts.append((kind, subject, span[0], span[1]))

    def done(self, end: str = ".") -> Sentence:
        self.toks.append(end)
        return Sentence(self.toks, self.ents, self.agrs, self.facts)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _common_np(rng: random.Random, b: _Builder, world: World, depth: int) -> tuple[int, bool]:
    """A common-noun subject ("the tired engineers near the bridge who admire Oslo's market ...");
    returns (index of the head noun, plural). Attractors and relative clauses carry their own number."""
    plural = rng.random() < 0.5
    b.toks.append("the" if b.toks else "The")
    r = rng.random()
    if r < 0.15:
        b.entity(rng.choice(world.places).demonym, "MISC")
    elif r < 0.3:
        b.toks.append(rng.choice(_ADJECTIVES))
    head = len(b.toks)
    noun = rng.choice(_PROFESSIONS)
    b.toks.append(noun + "s" if plural else noun)
    r = rng.random()
    if r < 0.35:  # prepositional attractor with its own number
        b.toks.extend(rng.choice(_PREPOSITIONS).split(" "))
        b.toks.append("the")
        thing = rng.choice(_THINGS)
        b.toks.append(thing + "s" if rng.random() < 0.5 else thing)
    elif r < 0.55 and depth < 2:  # subject relative: the verb agrees with the head
        b.toks.append("who")
        b.verb(rng.choice(_TRANSITIVE), head, plural)
        _object(rng, b, world)
    elif r < 0.7 and depth < 2:  # object relative: the verb agrees with the inner subject (an attractor)
        b.toks.append("that")
        inner_plural = rng.random() < 0.5
        b.toks.append("the")
        inner_head = len(b.toks)
        inner = rng.choice(_PROFESSIONS)
        b.toks.append(inner + "s" if inner_plural else inner)
        b.verb(rng.choice(_TRANSITIVE), inner_head, inner_plural)
    return head, plural


def _object(rng: random.Random, b: _Builder, world: World) -> None:
    r = rng.random()
    if r < 0.4:
        b.entity(rng.choice(world.persons).name, "PER")
    elif r < 0.6:
        b.entity(rng.choice(world.organisations).name, "ORG")
    else:
        b.toks.append("the")
        noun = rng.choice(_PROFESSIONS)
        b.toks.append(noun + "s" if rng.random() < 0.5 else noun)


def _predicate(rng: random.Random, b: _Builder, world: World, head: int, plural: bool) -> None:
    r = rng.random()
    if r < 0.35:
        b.verb(BE, head, plural)
        b.toks.append(rng.choice(_ADJECTIVES))
    elif r < 0.55:
        b.verb(rng.choice(_INTRANSITIVE), head, plural)
    elif r < 0.8:
        b.verb(rng.choice(_TRANSITIVE), head, plural)
        _object(rng, b, world)
    else:
        b.verb(rng.choice(_INTRANSITIVE), head, plural)
        b.toks.append("in")
        b.entity(rng.choice(world.places).city, "LOC")


def _generic_clause(rng: random.Random, b: _Builder, world: World, depth: int) -> None:
    head, plural = _common_np(rng, b, world, depth)
    _predicate(rng, b, world, head, plural)


def _generic_sentence(rng: random.Random, world: World, depth: int = 0) -> Sentence:
    """An agreement sentence, optionally a "that"-complement nesting another clause."""
    b = _Builder()
    r = rng.random()
    if r < 0.3:  # named sayer: "Alice Smith believes that the doctors near the bridge are tired."
        _, end = b.entity(rng.choice(world.persons).name, "PER")
        b.verb(rng.choice(_SAYING), end - 1, False)
        b.toks.append("that")
        _generic_clause(rng, b, world, depth + 1)
    elif r < 0.5:  # common-noun sayer
        head, plural = _common_np(rng, b, world, depth + 1)
        b.verb(rng.choice(_SAYING), head, plural)
        b.toks.append("that")
        _generic_clause(rng, b, world, depth + 1)
    else:
        _generic_clause(rng, b, world, depth)
    return b.done()


def _fact_sentence(rng: random.Random, world: World, person: Person) -> Sentence:
    """A sentence stating one or two facts about ``person`` (singular agreement throughout)."""
    b = _Builder()
    name = person.name
    _, end = b.entity(name, "PER")
    head = end - 1
    kind = rng.randrange(6)
    if kind == 0 or kind == 5:
        if kind == 5:  # non-restrictive relative clause carrying a second fact
            b.toks.extend((",", "who"))
            b.verb(WORK, head, False)
            b.toks.append("for")
            b.fact("employer", name, b.entity(person.employer, "ORG"))
            b.toks.append(",")
        b.verb(LIVE, head, False)
        b.toks.append("in")
        b.fact("city", name, b.entity(person.city, "LOC"))
    elif kind == 1:
        b.verb(WORK, head, False)
        b.toks.extend(("as", _article(person.profession)))
        b.fact("profession", name, (len(b.toks), len(b.toks) + 1))
        b.toks.extend((person.profession, "for"))
        b.fact("employer", name, b.entity(person.employer, "ORG"))
    elif kind == 2:
        b.verb(OWN, head, False)
        b.toks.append(_article(person.item_size))
        b.fact("item_size", name, (len(b.toks), len(b.toks) + 1))
        b.toks.append(person.item_size)
        b.fact("item_colour", name, (len(b.toks), len(b.toks) + 1))
        b.toks.extend((person.item_colour, person.item))
    elif kind == 3:
        b.verb(BE, head, False)
        b.toks.append(_article(person.nationality.lower()))
        b.fact("nationality", name, b.entity(person.nationality, "MISC"))
        b.fact("profession", name, (len(b.toks), len(b.toks) + 1))
        b.toks.append(person.profession)
    else:  # possessive: "Alice Smith's bicycle is red."
        b.toks.extend(("'s", person.item))
        b.verb(BE, len(b.toks) - 1, False)
        b.fact("item_colour", name, (len(b.toks), len(b.toks) + 1))
        b.toks.append(person.item_colour)
    return b.done()


def _organisation_sentence(rng: random.Random, world: World, org: Organisation) -> Sentence:
    b = _Builder()
    _, end = b.entity(org.name, "ORG")
    b.verb(BE, end - 1, False)
    b.toks.append(_article(org.field))
    b.fact("field", org.name, (len(b.toks), len(b.toks) + 1))
    b.toks.extend((org.field, "company", "based", "in"))
    b.fact("org_city", org.name, b.entity(org.city, "LOC"))
    if rng.random() < 0.5:
        place = world.place_of[org.city]
        b.toks.append(",")
        b.entity(place.country, "LOC")
    return b.done()


def _coordination_sentence(rng: random.Random, world: World, person: Person) -> Sentence | None:
    """ "Alice Smith and Bruno Okafor live in Oslo." - a plural subject made of named people; only when
    the world has a neighbour, so the sentence stays true."""
    neighbours = [p for p in world.residents[person.city] if p is not person]
    if not neighbours:
        return None
    other = rng.choice(neighbours)
    b = _Builder()
    b.entity(person.name, "PER")
    b.toks.append("and")
    _, end = b.entity(other.name, "PER")
    b.verb(LIVE, end - 1, True)
    b.toks.append("in")
    span = b.entity(person.city, "LOC")
    b.fact("city", person.name, span)
    b.fact("city", other.name, span)
    return b.done()


def _document_sentences(rng: random.Random, world: World) -> list[Sentence]:
    """A paragraph about one person: their facts, their employer, neighbours and generic sentences."""
    person = rng.choice(world.persons)
    sentences = [_fact_sentence(rng, world, person)]
    for _ in range(rng.randrange(2, 5)):
        r = rng.random()
        if r < 0.3:
            sentences.append(_fact_sentence(rng, world, person))
        elif r < 0.45:
            sentences.append(_organisation_sentence(rng, world, world.organisation_of[person.employer]))
        elif r < 0.55:
            sentences.append(_coordination_sentence(rng, world, person) or _fact_sentence(rng, world, person))
        elif r < 0.65:
            sentences.append(_fact_sentence(rng, world, rng.choice(world.persons)))
        else:
            sentences.append(_generic_sentence(rng, world))
    return sentences


def _random_sentence(rng: random.Random, world: World) -> Sentence:
    r = rng.random()
    if r < 0.5:
        return _generic_sentence(rng, world)
    if r < 0.8:
        return _fact_sentence(rng, world, rng.choice(world.persons))
    if r < 0.9:
        return _organisation_sentence(rng, world, rng.choice(world.organisations))
    person = rng.choice(world.persons)
    return _coordination_sentence(rng, world, person) or _fact_sentence(rng, world, person)


def _stream_rng(seed: int, purpose: str) -> random.Random:
    # Separate streams per purpose so that e.g. asking for more NER examples never changes the QA ones.
    return random.Random(f"raydistill-synthetic/{seed}/{purpose}")


# ------------------------------------------------------------------------------------------- public API


def generate_documents(num_documents: int, seed: int = 0) -> list[str]:
    """``num_documents`` paragraphs of 3-5 sentences about the world of ``seed`` (deterministic)."""
    world = build_world(seed)
    rng = _stream_rng(seed, "documents")
    return [detokenize([t for s in _document_sentences(rng, world) for t in s.tokens])
            for _ in range(num_documents)]


def heldout_documents(num_documents: int, seed: int = 0) -> list[str]:
    """Documents of the same world from a separate stream, for held-out perplexity: a model trained on
    :func:`generate_documents` has not seen them (beyond chance repeats of short paragraphs)."""
    world = build_world(seed)
    rng = _stream_rng(seed, "heldout")
    return [detokenize([t for s in _document_sentences(rng, world) for t in s.tokens])
            for _ in range(num_documents)]


def generate_sentences(num_sentences: int, seed: int = 0) -> list[Sentence]:
    """Annotated sentences of every kind the corpus contains (deterministic by seed)."""
    world = build_world(seed)
    rng = _stream_rng(seed, "sentences")
    return [_random_sentence(rng, world) for _ in range(num_sentences)]


def split_of(key: str) -> str:
    """The split an example belongs to, from a stable hash of its text: a quarter goes to dev."""
    return "dev" if hashlib.blake2b(key.encode(), digest_size=2).digest()[0] % 4 == 0 else "train"


def _check(n: int, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if n < 0:
        raise ValueError(f"number of examples must be >= 0, got {n}")


def _examples(n: int, seed: int, split: str, stream: str,
              draw: Callable[[random.Random, World], tuple[str, dict] | None]) -> list[dict]:
    """``n`` examples of ``split``: ``draw`` gives the text that decides an example's split and the example,
    or None to draw again."""
    _check(n, split)
    world = build_world(seed)
    rng = _stream_rng(seed, stream)
    out: list[dict] = []
    while len(out) < n:
        drawn = draw(rng, world)
        if drawn is not None and split_of(drawn[0]) == split:
            out.append(drawn[1])
    return out


def sentence_classification_examples(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """CoLA-like acceptability: ``{"sentence": str, "label": int}``, label 1 when every verb agrees with
    its subject, 0 when one verb was put in the other number. Balanced; train and dev never share a
    sentence."""
    def draw(rng: random.Random, world: World) -> tuple[str, dict] | None:
        sentence = _random_sentence(rng, world)
        if not sentence.agreements:
            return None
        tokens = sentence.tokens
        label = int(rng.random() < 0.5)
        if not label:
            _, verb, _ = rng.choice(sentence.agreements)
            tokens = tokens.copy()
            tokens[verb] = _FLIP[tokens[verb]]
        text = detokenize(tokens)
        return text, {"sentence": text, "label": label}

    return _examples(n, seed, split, "classification", draw)


def iob2_tags(num_tokens: int, entities: list[tuple[int, int, str]]) -> list[str]:
    tags = ["O"] * num_tokens
    for start, end, kind in entities:
        tags[start] = f"B-{kind}"
        for i in range(start + 1, end):
            tags[i] = f"I-{kind}"
    return tags


def ner_examples(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """CoNLL-2003-like NER: ``{"tokens": list[str], "ner_tags": list[str]}`` with IOB2 tags over
    PER/ORG/LOC/MISC."""
    def draw(rng: random.Random, world: World) -> tuple[str, dict]:
        sentence = _random_sentence(rng, world)
        return " ".join(sentence.tokens), {"tokens": sentence.tokens,
                                           "ner_tags": iob2_tags(len(sentence.tokens), sentence.entities)}

    return _examples(n, seed, split, "ner", draw)


_QUESTIONS = {
    "city": "Where does {} live?",
    "employer": "Which organisation does {} work for?",
    "profession": "What is the job of {}?",
    "nationality": "What nationality is {}?",
    "item_colour": "What colour is the {} that {} owns?",
    "item_size": "How big is the {} that {} owns?",
    "field": "What field is {} in?",
    "org_city": "Where is {} based?",
}


def _question(world: World, kind: str, subject: str) -> str:
    if kind in ("item_colour", "item_size"):
        return _QUESTIONS[kind].format(world.person_of[subject].item, subject)
    return _QUESTIONS[kind].format(subject)


def qa_examples(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """SQuAD-like extractive QA over generated paragraphs: ``{"id", "title", "context", "question",
    "answers": {"text": [str], "answer_start": [int]}}``; the answer is the span of the context sentence
    that states the fact asked about."""
    def draw(rng: random.Random, world: World) -> tuple[str, dict]:
        sentences = _document_sentences(rng, world)
        tokens: list[str] = []
        facts = []
        for s in sentences:
            facts.extend((kind, subj, len(tokens) + a, len(tokens) + b) for kind, subj, a, b in s.facts)
            tokens.extend(s.tokens)
        context = detokenize(tokens)
        kind, subject, start, end = rng.choice(facts)
        question = _question(world, kind, subject)
        offsets = token_offsets(tokens)
        answer_start = offsets[start]
        answer = context[answer_start:offsets[end - 1] + len(tokens[end - 1])]
        key = hashlib.blake2b(f"{seed}/{context}/{question}".encode(), digest_size=8).hexdigest()
        return context + "\n" + question, {
            "id": key, "title": sentences[0].tokens[0] + " " + sentences[0].tokens[1], "context": context,
            "question": question, "answers": {"text": [answer], "answer_start": [answer_start]}}

    return _examples(n, seed, split, "qa", draw)
