"""Tokenizer loading over sentencepiece / HF tokenizer.json / tiktoken files, and training."""
import json

import pytest

from megamoe.data.tokenizer import load_tokenizer

TEXT = "To be, or not to be: that is the question.\n\nWhether 'tis nobler  in the mind 1599 — ünïcode ✓"


def test_sentencepiece_mistral(spm_path):
    tok = load_tokenizer(spm_path)
    assert tok.kind == "sentencepiece" and tok.vocab_size == 32000
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
    ids = tok.encode(TEXT)
    assert tok.bos_id not in ids and tok.eos_id not in ids  # encode adds no specials
    assert tok.decode(ids) == TEXT


@pytest.mark.parametrize("name,vocab,eos", [("o200k", 200019, 199999), ("cl100k", 100277, 100257)])
def test_tiktoken_rank_files(request, name, vocab, eos):
    tok = load_tokenizer(request.getfixturevalue(f"{name}_path"))
    assert tok.kind == "tiktoken" and tok.vocab_size == vocab and tok.eos_id == eos and tok.pad_id is None
    ids = tok.encode(TEXT + " <|endoftext|>")
    assert eos not in ids  # special-token text in a document is ordinary text
    assert tok.decode(ids) == TEXT + " <|endoftext|>"


def test_tiktoken_known_encoding_checks_hash(tmp_path, cl100k_path):
    import gzip

    lines = gzip.open(cl100k_path, "rb").read().splitlines()
    bad = tmp_path / "cl100k_base.tiktoken"
    bad.write_bytes(b"\n".join(lines[:-1]) + b"\n")  # one rank missing: not the published file
    with pytest.raises(ValueError, match="sha256"):
        load_tokenizer(bad)


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([TEXT] * 20, trainer)
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    tok = load_tokenizer(tmp_path)  # a directory holding tokenizer.json
    assert tok.kind == "hf" and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    # tokenizer_config.json overrides the guessed eos
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<s>"}))
    assert load_tokenizer(path).eos_id == 1


def test_missing_and_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(bad)


def test_train_sentencepiece_round_trip(small_spm, shakespeare_dir):
    tok = load_tokenizer(small_spm)
    assert tok.kind == "sentencepiece" and tok.vocab_size == 600
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    text = (sorted(shakespeare_dir.glob("*.txt"))[5].read_text()[:3000]) + "\n  two  spaces\ttab 12345 ünïcode ✓\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # identity normalisation + byte fallback: exact
    assert len(ids) < 0.7 * len(text.encode())  # it learned merges (only ~270 with vocab 600)
    assert len(tok.encode(" the")) == 1  # no dummy prefix: a word piece carries its space
