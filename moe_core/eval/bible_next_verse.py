"""The built-in offline task, `bible_next_verse`.

bible_next_verse: given a verse, pick the verse that follows it from four verses of the same
book. Only the held-out books of the built-in corpus are used (`corpora.BIBLE_VALIDATION`), so a
model trained on the corpus never saw the pairs; distractors come from the same book, so style
and vocabulary do not give the answer away. The corpus writes a book as its verses joined by
"\\n", so a verse's natural continuation is "\\n" + the next verse: each choice is written that
way, and the model scores exactly the text it would have seen in training. (The newline is also
a byte-level BPE pre-token boundary, so the separate context/choice encoding of
`multiple_choice` gives the same ids as encoding the joined text.)
"""

from __future__ import annotations

import random
from functools import lru_cache

from moe_core.data.corpora import BIBLE_VALIDATION, VERSE_SEPARATOR, bible_verses
from moe_core.eval.examples import MCExample

DISTRACTORS = 3


@lru_cache(maxsize=1)
def heldout_verses() -> dict[str, tuple[tuple[str, str], ...]]:
    """Held-out book -> its (citation, text) verses in order; read once per process."""
    books = {book for names in BIBLE_VALIDATION.values() for book in names}
    verses: dict[str, list[tuple[str, str]]] = {}
    for verse in bible_verses():
        if verse["book"] in books:
            verses.setdefault(verse["book"], []).append((verse["citation"], verse["text"]))
    return {book: tuple(vs) for book, vs in verses.items()}


def bible_next_verse(n: int = 500, seed: int = 0) -> list[MCExample]:
    """`n` examples (at most one per consecutive verse pair of a held-out book), drawn and
    shuffled by `random.Random(seed)`: the same seed always gives the same task."""
    rng = random.Random(seed)
    books = heldout_verses()
    pairs = [(book, i) for book, verses in books.items() for i in range(len(verses) - 1)]
    examples = []
    for book, i in rng.sample(pairs, min(n, len(pairs))):
        verses = books[book]
        (citation, context), (_, true_next) = verses[i], verses[i + 1]
        # Distinct texts, in book order (a set's order would vary with string hashing).
        others = list(dict.fromkeys(t for _, t in verses if t not in (context, true_next)))
        choices = [true_next, *rng.sample(others, DISTRACTORS)]
        rng.shuffle(choices)
        examples.append(MCExample(
            context=context,
            choices=[VERSE_SEPARATOR + c for c in choices],
            label=choices.index(true_next),
            id=citation,
        ))
    return examples
