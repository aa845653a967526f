"""The bundled corpus: real text, shipped as package data, split into sensible documents."""

from __future__ import annotations

from importlib import resources

import pytest

from wattkd import corpus


def test_subcorpora_documents_are_real_text_of_reasonable_length():
    counts = {}
    for name in corpus.SUBCORPORA:
        docs = list(corpus.documents(name))
        counts[name] = len(docs)
        assert len(docs) > 50, name
        lengths = [len(d) for d in docs]
        assert min(lengths) >= 100 and max(lengths) <= 6000, (name, min(lengths), max(lengths))
        assert all("gutenberg" not in d.lower() and "\f" not in d for d in docs), name
    assert next(corpus.documents("kjv")).startswith("Genesis 1\n1 In the beginning God")
    assert any("To be, or not to be" in d for d in corpus.documents("shakespeare"))
    assert any("It is a truth universally acknowledged" in d for d in corpus.documents("austen"))
    assert any("Of Mans First Disobedience" in d for d in corpus.documents("milton"))
    assert sum(counts.values()) == sum(1 for _ in corpus.documents("all"))


def test_all_interleaves_every_subcorpus_early():
    by_doc = {d: n for n in corpus.SUBCORPORA for d in corpus.documents(n)}
    head = [by_doc[d] for _, d in zip(range(60), corpus.documents("all"))]
    assert set(head) == set(corpus.SUBCORPORA)
    assert list(corpus.documents("all")) == list(corpus.documents("all"))  # fixed order


def test_shipped_as_package_data_with_attribution():
    files = resources.files("wattkd.corpus")
    gz = [f for f in files.iterdir() if f.name.endswith(".txt.gz")]
    assert sorted(f.name for f in gz) == sorted(f"{n}.txt.gz" for n in corpus.SUBCORPORA)
    assert sum(len(f.read_bytes()) for f in gz) <= 3_000_000
    attribution = files.joinpath("ATTRIBUTION.md").read_text(encoding="utf-8")
    for word in ("King James", "Shakespeare", "Milton", "Austen", "public domain"):
        assert word in attribution
    assert len(corpus.fingerprint("all")) == 64
    assert corpus.fingerprint("kjv") != corpus.fingerprint("austen")


def test_unknown_subcorpus_is_refused():
    with pytest.raises(ValueError, match="unknown bundled corpus 'bible'.*kjv"):
        list(corpus.documents("bible"))
