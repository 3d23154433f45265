"""Multiple-choice downstream evaluation: scoring against a naive loop, acc vs acc_norm, the JSONL
loader's errors, the built-in bible_next_verse task, and evaluation leaving the model as it was."""

from __future__ import annotations

import math
from itertools import pairwise
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from moe_core import ConfigError, ModelOutput, build_model
from moe_core.data.corpora import BIBLE_VALIDATION
from moe_core.data.tokenizers import ByteTokenizer
from moe_core.eval.bible_next_verse import bible_next_verse, heldout_verses
from moe_core.eval.examples import MCExample, load_task
from moe_core.eval.multiple_choice import score_choices
from moe_core.eval.tasks import resolve_task
from tests.conftest import experts, tiny

TOK = ByteTokenizer()
EXAMPLES = [
    MCExample("The capital of France is", [" Paris", " Rome", " a city on the Seine"], 0),
    MCExample("", [" empty context", "!"], 1),  # scored after the end-of-text token
    MCExample("Once upon a time there was a long context", [" end.", " and they lived happily ever after"], 1),
    MCExample("Q", ["\nverse", " é"], 0),  # multi-byte UTF-8
]


def _moe(**moe) -> nn.Module:
    cfg = tiny({"layout": "layerwise", "experts": [experts(4, 2)], **moe}, vocab_size=257, seq_len=64)
    return build_model(cfg)


def _naive_logprob(model: nn.Module, context: str, choice: str, max_len: int) -> float:
    """One request alone: log-softmax over the whole sequence, summed at the choice's tokens
    (those that fit in the last max_len + 1 tokens)."""
    ctx = list(context.encode()) or [TOK.eos_id]
    cont = list(choice.encode())
    ids = (ctx + cont)[-(max_len + 1):]
    with torch.no_grad():
        lp = model(torch.tensor([ids[:-1]])).logits[0].float().log_softmax(-1)
    first = len(ids) - 1 - min(len(cont), max_len)
    return sum(lp[p, ids[p + 1]].item() for p in range(first, len(ids) - 1))


# 24 truncates the long requests from the left, and one choice (34 bytes) is itself cut.
@pytest.mark.parametrize("max_len, cut", [(64, 0), (24, 1)])
def test_summed_logprobs_match_a_naive_loop_at_any_batch_size(max_len, cut):
    model = _moe().eval()
    want = [[_naive_logprob(model, ex.context, c, max_len) for c in ex.choices] for ex in EXAMPLES]
    for batch_size in (1, 5):  # 5: requests of different lengths padded together
        result = score_choices(model, TOK, EXAMPLES, batch_size=batch_size, max_len=max_len)
        assert result.truncated == cut
        for got, expected in zip(result.logprobs, want):
            assert got == pytest.approx(expected, abs=1e-5)


class Bigram(nn.Module):
    """A stub language model: the next token's logits depend only on the current token."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)
        self.cfg = SimpleNamespace(vocab_size=table.shape[0], seq_len=64)

    def forward(self, idx_BS: torch.Tensor) -> ModelOutput:
        return ModelOutput(logits=self.table[idx_BS])


def _bigram(logprobs: dict[tuple[str, str], float], rest: float = 0.0) -> Bigram:
    """Rows whose given (previous, next) entries have exactly these log-probs; the remaining
    mass of a row is spread evenly over its other tokens (`rest` = unnormalised filler)."""
    v = TOK.vocab_size
    table = torch.full((v, v), rest, dtype=torch.float64)
    for a in {a for a, _ in logprobs}:
        row = {ord(b): lp for (a2, b), lp in logprobs.items() if a2 == a}
        left = 1 - sum(math.exp(lp) for lp in row.values())
        table[ord(a)] = math.log(left / (v - len(row)))
        for b, lp in row.items():
            table[ord(a), b] = lp
    return Bigram(table.float())


def test_acc_and_acc_norm_disagree_when_the_long_choice_is_likelier_per_byte():
    # " x": -0.1 - 3 = -3.1 in all, -1.55 per byte; " yyyyyyy": -0.1 - 7 = -7.1 in all, -0.89 per byte.
    model = _bigram({("Q", " "): -0.1, (" ", "x"): -3.0, (" ", "y"): -1.0, ("y", "y"): -1.0})
    result = score_choices(model, TOK, [MCExample("Q", [" x", " yyyyyyy"], label=1)])
    assert result.logprobs[0] == pytest.approx((-3.1, -7.1), abs=1e-5)
    assert (result.pred, result.pred_norm) == ((0,), (1,))
    assert (result.acc, result.acc_norm, result.n) == (0.0, 1.0, 1)


def test_a_model_that_knows_the_answers_scores_one():
    # It has learnt that each letter is followed by the next one of the alphabet.
    letters = "abcdefghijklmnopqrstuvwxyz"
    model = _bigram({(a, b): math.log(0.9) for a, b in pairwise(letters)})
    examples = [
        MCExample("abc", ["def", "dfe", "xyz"], 0),
        MCExample("klm", ["nnn", "nop", "utsrqpon"], 1),
        MCExample("pq", ["rt", "sr", "ab", "rstuvw"], 3),
    ]
    result = score_choices(model, TOK, examples, batch_size=2)
    assert (result.acc, result.acc_norm, result.n) == (1.0, 1.0, 3)


GOOD = '{"context": "c", "choices": [" a", " b"], "label": 1, "id": "q1"}'


@pytest.mark.parametrize("bad, says", [
    ('{"context": "c", "choices": [" a"], "label": 0', "invalid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"choices": [" a"], "label": 0}', "missing key 'context'"),
    ('{"context": "c", "choices": [" a"]}', "missing key 'label'"),
    ('{"context": "c", "choices": [" a"], "label": 0, "answer": 0}', "unknown key 'answer'; allowed: context"),
    ('{"context": 5, "choices": [" a"], "label": 0}', "context must be a string"),
    ('{"context": "c", "choices": [], "label": 0}', "choices must be a non-empty list"),
    ('{"context": "c", "choices": " a", "label": 0}', "choices must be a non-empty list"),
    ('{"context": "c", "choices": [" a", 3], "label": 0}', r"choices\[1\] must be a non-empty string"),
    ('{"context": "c", "choices": [" a", ""], "label": 0}', r"choices\[1\] must be a non-empty string"),
    ('{"context": "c", "choices": [" a"], "label": "0"}', "label must be an integer"),
    ('{"context": "c", "choices": [" a"], "label": true}', "label must be an integer"),
    ('{"context": "c", "choices": [" a", " b"], "label": 3}',
     r"label 3 is out of range for 2 choices \(allowed 0\.\.1\)"),
    ('{"context": "c", "choices": [" a"], "label": 0, "id": 7}', "id must be a string or null"),
])
def test_each_bad_line_is_a_one_line_error_naming_file_and_line(tmp_path, bad, says):
    path = tmp_path / "boolq.jsonl"
    path.write_text(f"{GOOD}\n\n{bad}\n{GOOD}\n")  # the bad line is line 3
    with pytest.raises(ConfigError, match=f"^{path}:3: {says}") as err:
        load_task(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_a_task_file_without_examples_is_an_error(tmp_path, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^{path}: the task file has no examples"):
        load_task(path)


def test_task_files_load_and_resolve_by_path(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(f'{GOOD}\n\n{{"context": "d", "choices": [" x"], "label": 0}}\n')
    examples = [MCExample("c", [" a", " b"], 1, "q1"), MCExample("d", [" x"], 0, None)]
    assert load_task(path) == examples
    assert resolve_task(str(path)) == ("mine", examples)
    assert resolve_task(str(path), n=1) == ("mine", examples[:1])
    with pytest.raises(ConfigError, match="unknown task 'boolq': give a built-in task \\(bible_next_verse\\)") as err:
        resolve_task("boolq")
    assert "\n" not in str(err.value)


def test_bible_next_verse_is_seeded_and_held_out():
    a = bible_next_verse(40, seed=1)
    assert a == bible_next_verse(40, seed=1) and a != bible_next_verse(40, seed=2)
    assert resolve_task("bible_next_verse", seed=1, n=40) == ("bible_next_verse", a)
    books = heldout_verses()
    assert set(books) == {b for names in BIBLE_VALIDATION.values() for b in names}
    following = {cite: (book, verses[i + 1][1]) for book, verses in books.items()
                 for i, (cite, _) in enumerate(verses[:-1])}
    for ex in a:
        book, true_next = following[ex.id]  # the context is a held-out verse with a successor
        assert ex.context == dict(books[book])[ex.id]
        assert len(set(ex.choices)) == 4 and 0 <= ex.label < 4
        assert all(c.startswith("\n") for c in ex.choices)  # the corpus joins verses with "\n"
        assert ex.choices[ex.label] == "\n" + true_next
        same_book = {text for _, text in books[book]} - {ex.context}  # never the context, never another book
        assert {c[1:] for c in ex.choices} <= same_book
    pairs = sum(len(v) - 1 for v in books.values())
    assert len(bible_next_verse(10**6)) == pairs  # n is capped at the verse pairs there are


@pytest.mark.parametrize("moe", [
    {"balance": {"aux_scope": "global_batch", "bias_rate": 0.01}},
    {"layout": "unipool", "balance": {"pool_weight": 0.01}},
])
@pytest.mark.parametrize("training", [True, False])
def test_evaluation_leaves_mode_and_routing_state_untouched(moe, training):
    model = _moe(**moe)
    model.train()
    model(torch.randint(0, 257, (2, 16)), torch.randint(0, 257, (2, 16)))  # a training forward: counters move
    model.train(training)
    before = {name: b.clone() for name, b in model.named_buffers()}
    result = score_choices(model, TOK, bible_next_verse(6), batch_size=4, max_len=48)
    assert result.n == 6 and 0 <= result.acc <= 1 and len(result.pred) == 6
    assert model.training is training
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), name
    if training:  # the check can see a change: another training forward moves the counters
        model(torch.randint(0, 257, (2, 16)), torch.randint(0, 257, (2, 16)))
        assert any(not torch.equal(b, before[n]) for n, b in model.named_buffers())
