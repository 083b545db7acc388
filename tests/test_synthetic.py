"""The built-in corpus: determinism, grammar, world consistency and the derived task schemas."""

from __future__ import annotations

import re
import time

import pytest

from raydistill.data import synthetic as syn

_LIVES = re.compile(r"([A-Z][a-z]+ [A-Z][a-z]+)(?:, who works for [^,]+,)? lives in ([A-Z][a-z]+(?: [A-Z][a-z]+)?)[.,]")


def test_documents_are_deterministic_and_seed_dependent():
    a = syn.generate_documents(200, seed=3)
    assert a == syn.generate_documents(200, seed=3)
    assert a != syn.generate_documents(200, seed=4)
    assert len(a) == 200 and all(isinstance(d, str) and d.count(".") >= 3 for d in a)
    # Asking for fewer documents gives a prefix: the stream does not depend on the count.
    assert syn.generate_documents(50, seed=3) == a[:50]


def test_tasks_are_deterministic_and_seed_dependent():
    for make in (syn.sentence_classification_examples, syn.ner_examples, syn.qa_examples):
        assert make(40, 1, "train") == make(40, 1, "train")
        assert make(40, 1, "train") != make(40, 2, "train")


def test_generation_is_fast():
    start = time.perf_counter()
    docs = syn.generate_documents(20_000, seed=0)
    assert time.perf_counter() - start < 2.0
    assert len(docs) == 20_000


def test_people_always_live_in_the_same_city_within_a_world():
    world = syn.build_world(5)
    seen: dict[str, set[str]] = {}
    for doc in syn.generate_documents(2000, seed=5):
        for name, city in _LIVES.findall(doc):
            seen.setdefault(name, set()).add(city)
    assert len(seen) > 50
    for name, cities in seen.items():
        assert cities == {world.person_of[name].city}, name
    # Another seed is another world: some people moved.
    other = syn.build_world(6)
    shared = set(world.person_of) & set(other.person_of)
    assert any(world.person_of[n].city != other.person_of[n].city for n in shared)


def test_every_verb_agrees_with_its_subject():
    sentences = syn.generate_sentences(3000, seed=0)
    plural_seen = singular_seen = nested = 0
    for s in sentences:
        for head, verb, plural in s.agreements:
            assert head < verb
            form = s.tokens[verb]
            # In the lexicon singular verbs end in "s" ("is", "lives") and plural ones never do.
            assert form.endswith("s") == (not plural), (s.text, form)
            noun = s.tokens[head]
            if noun[0].islower():  # common noun: regular plural in -s
                assert noun.endswith("s") == plural, (s.text, noun)
            else:  # a named subject is plural only as a coordination "X and Y"
                assert ("and" in s.tokens[:head]) == plural, s.text
            plural_seen += plural
            singular_seen += not plural
        nested += len(s.agreements) > 1
    assert plural_seen > 500 and singular_seen > 500 and nested > 300


def test_attractors_occur_between_subject_and_verb():
    # Agreement must be learnable beyond "copy the number of the previous noun": many verbs have a noun of
    # the other number between them and their subject.
    nouns = syn._PROFESSIONS + syn._THINGS
    number_of = {n: False for n in nouns} | {n + "s": True for n in nouns}
    count = 0
    for s in syn.generate_sentences(2000, seed=0):
        for head, verb, plural in s.agreements:
            if any(number_of.get(t, plural) != plural for t in s.tokens[head + 1:verb]):
                count += 1
    assert count > 100


def test_classification_labels_match_agreement():
    examples = syn.sentence_classification_examples(2000, seed=0, split="train")
    labels = [e["label"] for e in examples]
    assert 0.4 < sum(labels) / len(labels) < 0.6
    simple = re.compile(r"^[A-Z][a-z]+ [A-Z][a-z]+ (lives|live) in ")
    checked = 0
    for e in examples:
        m = simple.match(e["sentence"])
        if m:
            assert e["label"] == int(m.group(1) == "lives"), e
            checked += 1
    assert checked > 20


def test_ner_tags_are_valid_iob2_and_align_with_tokens():
    world = syn.build_world(0)
    names = set(world.person_of)
    examples = syn.ner_examples(1000, seed=0, split="train")
    types_seen = set()
    for e in examples:
        tokens, tags = e["tokens"], e["ner_tags"]
        assert len(tokens) == len(tags) > 0
        previous = "O"
        for tag in tags:
            assert tag == "O" or (tag[:2] in ("B-", "I-") and tag[2:] in syn.ENTITY_TYPES), tag
            if tag.startswith("I-"):
                assert previous[2:] == tag[2:], tags
            previous = tag
        # Read spans back and check PER spans are people of the world.
        i = 0
        while i < len(tags):
            if tags[i].startswith("B-"):
                j = i + 1
                while j < len(tags) and tags[j] == "I-" + tags[i][2:]:
                    j += 1
                types_seen.add(tags[i][2:])
                if tags[i] == "B-PER":
                    assert " ".join(tokens[i:j]) in names
                i = j
            else:
                i += 1
    assert types_seen == set(syn.ENTITY_TYPES)
    assert any(t.startswith("I-LOC") for e in examples for t in e["ner_tags"])


def test_qa_answers_are_spans_of_the_context_and_true_in_the_world():
    world = syn.build_world(0)
    examples = syn.qa_examples(500, seed=0, split="train")
    checked_city = 0
    for e in examples:
        (text,), (start,) = e["answers"]["text"], e["answers"]["answer_start"]
        assert e["context"][start:start + len(text)] == text
        m = re.fullmatch(r"Where does (.+) live\?", e["question"])
        if m:
            assert text == world.person_of[m.group(1)].city
            checked_city += 1
        m = re.fullmatch(r"Where is (.+) based\?", e["question"])
        if m:
            assert text == world.organisation_of[m.group(1)].city
    assert checked_city > 10
    assert len({e["id"] for e in examples}) == len(examples)
    assert len({e["question"].split()[0] for e in examples}) >= 3


@pytest.mark.parametrize("make,key", [
    (syn.sentence_classification_examples, lambda e: e["sentence"]),
    (syn.ner_examples, lambda e: " ".join(e["tokens"])),
    (syn.qa_examples, lambda e: (e["context"], e["question"])),
])
def test_train_and_dev_are_disjoint(make, key):
    train = {key(e) for e in make(1500, 0, "train")}
    dev = {key(e) for e in make(500, 0, "dev")}
    assert len(dev) > 100
    assert not train & dev


def test_bad_split_is_rejected():
    with pytest.raises(ValueError, match="unknown split"):
        syn.ner_examples(5, 0, "test")
