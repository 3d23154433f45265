"""Corpora, tokenizers and the token cache."""

import json
import multiprocessing as mp

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_core import ConfigError
from moe_core.data.config import DataConfig
from moe_core.data.corpora import BIBLE_VALIDATION, bible_documents
from moe_core.data.tokenizers import ByteTokenizer
from moe_core.data.tokens import prepare_tokens


def test_bible_validation_is_whole_books_and_deterministic():
    docs = list(bible_documents())
    assert len(docs) == 66  # one document per book
    by_split = {}
    for split, text in docs:
        by_split.setdefault(split, []).append(text)
    assert sorted(by_split) == ["bible_nt", "bible_ot", "train"]
    assert len(by_split["bible_ot"]) == len(BIBLE_VALIDATION["bible_ot"]) == 3
    assert by_split["bible_ot"][0].startswith("Now it came to pass in the days when the judges ruled")  # Ruth 1:1
    assert not any("Naomi" in t for t in by_split["train"])  # Naomi appears only in Ruth
    assert docs == list(bible_documents())


def test_bible_tokens_cache_is_built_once_and_split_by_book(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path))
    data = prepare_tokens(cfg)
    assert set(data.val) == {"bible_ot", "bible_nt"}
    assert data.manifest["documents"] == {"train": 60, "bible_ot": 3, "bible_nt": 3}
    assert 900_000 < len(data.train) < 1_200_000  # about 1M BPE-4096 tokens
    assert data.tokenizer.decode(list(data.val["bible_nt"][:9])).startswith("Paul and Timotheus")
    again = prepare_tokens(cfg)
    assert np.array_equal(np.asarray(again.train), np.asarray(data.train))
    assert len(list((tmp_path / "tokens").iterdir())) == 2  # the cache folder and its lock file


def test_bpe_and_byte_tokenizers_round_trip(tmp_path):
    data = prepare_tokens(DataConfig(cache_dir=str(tmp_path)))
    text = "And God said, Let there be light: and there was light. Ünïcode ✓"
    for tok in (data.tokenizer, ByteTokenizer()):
        ids = tok.encode_batch([text])[0]
        assert tok.decode(ids) == text
        assert max(ids) < tok.vocab_size
    assert data.tokenizer.vocab_size == 4096


def _write_corpus(tmp_path, n=200):
    texts = [f"document {i}: " + " ".join(f"w{(i * j) % 97}" for j in range(30)) for i in range(n)]
    with (tmp_path / "a.jsonl").open("w") as f:
        for t in texts[: n // 2]:
            f.write(json.dumps({"text": t, "id": 1}) + "\n")
    pq.write_table(pa.table({"text": texts[n // 2 :]}), tmp_path / "b.parquet", row_group_size=16)
    return texts


def test_user_corpora_stream_from_jsonl_and_parquet_with_a_hash_held_out_split(tmp_path):
    texts = _write_corpus(tmp_path)
    cfg = DataConfig(source="files", paths=(str(tmp_path / "*.jsonl"), str(tmp_path / "*.parquet")),
                     tokenizer="bytes", val_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    data = prepare_tokens(cfg)
    assert set(data.val) == {"heldout"}
    docs = data.manifest["documents"]
    assert docs["train"] + docs["heldout"] == len(texts) and 5 <= docs["heldout"] <= 40
    decoded = bytes(int(t) for t in data.train if t < 256).decode()
    assert texts[0] in decoded or texts[0] in bytes(int(t) for t in data.val["heldout"] if t < 256).decode()


def test_bad_corpus_paths_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no file matches"):
        prepare_tokens(DataConfig(source="files", paths=(str(tmp_path / "none*.txt"),), cache_dir=str(tmp_path)))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ConfigError, match="unsupported file type"):
        prepare_tokens(DataConfig(source="files", paths=(str(tmp_path / "x.csv"),), cache_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="source 'files' needs at least one entry in paths"):
        DataConfig(source="files")


def _build(args):
    cache, corpus = args
    cfg = DataConfig(source="files", paths=(corpus,), tokenizer="bpe", bpe_vocab_size=300, val_fraction=0.2, cache_dir=cache)
    data = prepare_tokens(cfg)
    return len(data.train), {k: len(v) for k, v in data.val.items()}


def test_two_processes_building_one_cache_produce_one_valid_cache(tmp_path):
    _write_corpus(tmp_path, n=400)
    args = (str(tmp_path / "cache"), str(tmp_path / "a.jsonl"))
    with mp.get_context("spawn").Pool(2) as pool:
        results = pool.map(_build, [args, args])
    assert results[0] == results[1]
    token_dirs = [p for p in (tmp_path / "cache" / "tokens").iterdir() if p.is_dir()]
    assert len(token_dirs) == 1 and not any(p.name.startswith(".") for p in token_dirs)
    manifest = json.loads((token_dirs[0] / "manifest.json").read_text())
    assert manifest["tokens"]["train"] == results[0][0]


def test_debian_docs_corpus_holds_out_a_validation_set_per_source(tmp_path):
    from moe_core.data.corpora import debian_docs_dir
    from moe_core.data.debian_docs import build_debian_docs

    cfg = DataConfig(source="debian_docs", tokenizer="bytes", val_fraction=0.2, cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="build-corpus debian-docs"):
        prepare_tokens(cfg)
    fake = {
        "python_docs": ((f"lib/{i}.rst", f"The module {i} provides functions.\n" * 5) for i in range(60)),
        "perl_docs": ((f"pod/{i}.pod", f"=head1 NAME\n\nperl{i} - manual page {i}\n") for i in range(60)),
    }
    assert build_debian_docs(debian_docs_dir(cfg), fake) == {"python_docs": 60, "perl_docs": 60}
    data = prepare_tokens(cfg)
    assert set(data.val) == {"python_docs", "perl_docs"}
    assert data.manifest["documents"]["train"] + sum(data.manifest["documents"][k] for k in data.val) == 120
    with pytest.raises(ConfigError, match="no documents found for linux_docs"):
        build_debian_docs(tmp_path / "x", {"linux_docs": iter(())})


def test_gpt2_bpe_loads_offline_with_gpt2_ids(tmp_path):
    from moe_core.data.tokenizers import gpt2_tokenizer

    tok = gpt2_tokenizer()
    assert tok.encode_batch(["Hello world"]) == [[15496, 995]]
    assert (tok.vocab_size, tok.eos_id, tok.name) == (50257, 50256, "gpt2")
    assert tok.decode(tok.encode_batch(["Ünïcode ✓"])[0]) == "Ünïcode ✓"
    data = prepare_tokens(DataConfig(tokenizer="gpt2", cache_dir=str(tmp_path)))
    assert data.manifest["tokenizer"] == "gpt2" and data.train.dtype == np.uint16
