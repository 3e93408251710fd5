"""Write a megamoe tokenizer into a Hugging Face model directory so `AutoTokenizer` loads it offline.

* sentencepiece `.model`: transformers 5 builds an EMPTY tokenizer from `LlamaTokenizer(vocab_file=)`
  (3 tokens, encodes to []). What works: a directory holding the file as `tokenizer.model` plus a
  `tokenizer_config.json` naming LlamaTokenizer; `AutoTokenizer.from_pretrained` converts it to a
  fast tokenizer whose `save_pretrained` writes a `tokenizer.json` that reloads offline. We do
  that in a scratch directory, then CHECK that the result encodes a probe text to exactly the
  sentencepiece ids before writing anything.
* HF `tokenizer.json`: copied (with its tokenizer_config.json when there is one).
* tiktoken rank files: refused (no exact converter we can verify offline); retrain or convert
  the tokenizer to tokenizer.json first.

Like our data pipeline (which never adds bos, and appends eos per document), the exported
tokenizer does not add bos/eos when encoding: `add_bos_token`/`add_eos_token` are false.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

PROBE = ("Hello world! The quick brown fox jumps over the lazy dog.\n  Indented line, numbers 12345, "
         "punctuation: (a), [b]; {c} -- d's e'll.\nNon-ASCII: café, naïve, Zürich, 東京, emoji 🙂.\n\n")


class TokenizerExportError(ValueError):
    """The tokenizer cannot be exported exactly; the message says why and what to do."""


def _special(tok, i):
    return None if i is None else tok.decode([i]) if tok.kind != "sentencepiece" else tok.sp.id_to_piece(i)


def export_tokenizer(path, out_dir, cfg=None) -> None:
    """Write tokenizer files for `path` (any file megamoe.data.load_tokenizer reads) into out_dir."""
    from megamoe.data.tokenizer import load_tokenizer

    path, out_dir = Path(path), Path(out_dir)
    if not path.exists():
        raise TokenizerExportError(f"tokenizer {path} (recorded in the checkpoint) does not exist; pass "
                                   "--tokenizer PATH, or --no-tokenizer to export without one")
    tok = load_tokenizer(str(path))
    if cfg is not None and tok.vocab_size > cfg.vocab_size:
        raise TokenizerExportError(f"tokenizer {path} has {tok.vocab_size} tokens but the model's vocab_size is "
                                   f"{cfg.vocab_size}: ids would index past the embedding")
    if tok.kind == "sentencepiece":
        _export_sentencepiece(tok, out_dir)
    elif tok.kind == "hf":
        _export_hf(tok, out_dir)
    else:
        raise TokenizerExportError(
            f"tokenizer {path} is a tiktoken rank file, which has no exact offline conversion to a transformers "
            "tokenizer here; export with --no-tokenizer and load the tokenizer with tiktoken, or train the model "
            "with a sentencepiece / tokenizer.json tokenizer")
    _verify(tok, out_dir)


def _export_sentencepiece(tok, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    sp = tok.sp
    cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
           "bos_token": sp.id_to_piece(tok.bos_id) if tok.bos_id is not None else None,
           "eos_token": sp.id_to_piece(tok.eos_id) if tok.eos_id is not None else None,
           "unk_token": sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None,
           "pad_token": sp.id_to_piece(tok.pad_id) if tok.pad_id is not None else None,
           "legacy": False, "clean_up_tokenization_spaces": False,
           # sentencepiece prepends "▁" only if the model was trained with add_dummy_prefix
           "add_prefix_space": _add_dummy_prefix(tok.path)}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with tempfile.TemporaryDirectory(prefix="megamoe-tok-") as scratch:
        scratch = Path(scratch)
        shutil.copyfile(tok.path, scratch / "tokenizer.model")
        (scratch / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
        hf = AutoTokenizer.from_pretrained(str(scratch), local_files_only=True)
        try:
            _check_ids(hf, tok, "the converted sentencepiece tokenizer")
        except TokenizerExportError:
            if not _proto(tok.path).trainer_spec.split_by_whitespace:
                raise
            # sentencepiece's whitespace pre-split differs from BPE over the joined text here
            _split_like_sentencepiece(hf, cfg["add_prefix_space"])
            _check_ids(hf, tok, "the converted sentencepiece tokenizer")
        hf.save_pretrained(str(out_dir))
    # LlamaTokenizer.__init__ rebuilds its own pre-tokenizer on load, ignoring tokenizer.json's;
    # the generic fast class loads tokenizer.json exactly as written
    written = json.loads((out_dir / "tokenizer_config.json").read_text())
    written["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out_dir / "tokenizer_config.json").write_text(json.dumps(written, indent=2))
    # keep the original model file too (slow tokenizer / sentencepiece users)
    shutil.copyfile(tok.path, out_dir / "tokenizer.model")


def _proto(model_file: str):
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    return proto


def _add_dummy_prefix(model_file: str) -> bool:
    return bool(_proto(model_file).normalizer_spec.add_dummy_prefix)


def _split_like_sentencepiece(hf, add_prefix_space: bool) -> None:
    """transformers' Llama conversion runs BPE over the whole "▁"-joined text, so "a  b" becomes
    "▁a" "▁▁" "b"; sentencepiece (split_by_whitespace) first cuts words at whitespace, a run of
    spaces going to its own piece except the last, which starts the next word: "▁a" "▁" "▁b".
    The Split regex reproduces that cut before BPE."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    # sentencepiece's dummy prefix is added even before a leading space (" x" -> "▁▁x"); the
    # Metaspace pre-tokenizer skips it then, so prepend in the normalizer instead
    steps = ([normalizers.Prepend("\u2581")] if add_prefix_space else []) + [normalizers.Replace(" ", "\u2581")]
    hf.backend_tokenizer.normalizer = normalizers.Sequence(steps)
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Split(
        Regex("\u2581+(?=\u2581[^\u2581])|\u2581?[^\u2581]+|\u2581+"), behavior="isolated")


def _export_hf(tok, out_dir: Path) -> None:
    src = Path(tok.path)
    shutil.copyfile(src, out_dir / "tokenizer.json")
    cfg_src = src.with_name("tokenizer_config.json")
    if cfg_src.exists():
        cfg = json.loads(cfg_src.read_text())
    else:
        cfg = {}
    cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    for key, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("pad_token", tok.pad_id)):
        if i is not None and key not in cfg:
            cfg[key] = tok.tk.id_to_token(i)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def _check_ids(hf, tok, what: str) -> None:
    want = tok.encode(PROBE)
    got = hf(PROBE, add_special_tokens=False)["input_ids"]
    with_special = hf(PROBE)["input_ids"]
    if got != want or with_special != want:
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise TokenizerExportError(f"{what} does not reproduce the training tokenizer's ids ({tok.path}): "
                                   f"first difference at position {first} (got {got[first:first + 5]}, "
                                   f"expected {want[first:first + 5]}); not exporting a tokenizer that would "
                                   "silently change the model's inputs")
    if tok.eos_id is not None and hf.eos_token_id != tok.eos_id:
        raise TokenizerExportError(f"{what}: eos id {hf.eos_token_id} != {tok.eos_id} of {tok.path}")


def _verify(tok, out_dir: Path) -> None:
    """Reload the written directory exactly as a user would (offline) and compare ids."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    _check_ids(hf, tok, f"the exported tokenizer in {out_dir}")
