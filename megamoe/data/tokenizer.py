"""One tokenizer interface over sentencepiece models, HF ``tokenizer.json`` files and tiktoken rank files.

:func:`load_tokenizer` picks the backend from the file (nothing is ever downloaded):

* a sentencepiece ``.model`` (protobuf)                          -> ``kind == "sentencepiece"``
* a Hugging Face ``tokenizer.json`` (or a directory holding one) -> ``kind == "hf"``
* a tiktoken rank file (``*.tiktoken`` or ``*.tiktoken.gz``, lines ``base64 rank``) -> ``"tiktoken"``

``encode`` never adds bos/eos and never parses special-token text (``"<|endoftext|>"`` in a
document is ordinary text); the data pipeline appends ``eos_id`` itself (``--append-eod``).

:func:`train_sentencepiece` trains the BPE model used by ``tools/train_tokenizer.py``.
"""
from __future__ import annotations

import base64
import gzip
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence

__all__ = ["Tokenizer", "SentencePieceTokenizer", "HFTokenizer", "TiktokenTokenizer",
           "load_tokenizer", "train_sentencepiece"]


class Tokenizer:
    """Common interface. ``pad_id``/``bos_id``/``eos_id`` are ``None`` when the vocabulary has none."""

    kind: str = ""
    path: str
    vocab_size: int
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    pad_id: Optional[int] = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})")


def _opt(i: int) -> Optional[int]:
    return None if i is None or i < 0 else int(i)


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = str(path)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = int(self.sp.get_piece_size())
        self.bos_id = _opt(self.sp.bos_id())
        self.eos_id = _opt(self.sp.eos_id())
        self.pad_id = _opt(self.sp.pad_id())

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One thread: the preprocessing pipeline parallelises across worker processes.
        return self.sp.encode(list(texts), num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


# Special-token spellings tried (in order) when a tokenizer.json has no tokenizer_config.json.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>", "[SEP]")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` file. Special ids come from a sibling ``tokenizer_config.json``
    (``bos_token``/``eos_token``/``pad_token``) when present, else from common spellings."""

    kind = "hf"

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _HF

        self.path = str(path)
        self.tk = _HF.from_file(self.path)
        self.vocab_size = int(self.tk.get_vocab_size(with_added_tokens=True))
        cfg = {}
        cfg_path = Path(self.path).with_name("tokenizer_config.json")
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                cfg = {}

        def find(key: str, names: Sequence[str]) -> Optional[int]:
            tok = cfg.get(key)
            if isinstance(tok, dict):
                tok = tok.get("content")
            for name in ([tok] if tok else []) + list(names):
                i = self.tk.token_to_id(name)
                if i is not None:
                    return int(i)
            return None

        self.bos_id = find("bos_token", _BOS_NAMES)
        self.eos_id = find("eos_token", _EOS_NAMES)
        self.pad_id = find("pad_token", _PAD_NAMES)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)


_TIKTOKEN_LOCK = threading.Lock()


def _read_tiktoken_ranks(path: str) -> tuple[dict[bytes, int], bytes]:
    """Parse a (possibly gzipped) tiktoken rank file. Returns (ranks, raw uncompressed bytes).

    The format is tiktoken's (``load_tiktoken_bpe``): one ``base64(token) rank`` per line. We
    parse the bytes here instead of calling ``load_tiktoken_bpe(path)`` because that function
    cannot read .gz files and copies every local file it reads into a cache directory in /tmp.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(raw.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except Exception as e:
            raise ValueError(f"{path}:{n}: not a tiktoken rank file line ({line[:60]!r})") from e
    return ranks, raw


def _tiktoken_definition(name: str, ranks: dict[bytes, int], raw: Optional[bytes]) -> Optional[dict]:
    """pat_str and special tokens for a known encoding name, taken from tiktoken's own
    definitions (tiktoken_ext.openai_public) with its download replaced by our local ranks; the
    local file must match the published sha256, so a wrong or damaged file is refused."""
    import hashlib
    from unittest import mock

    try:
        import tiktoken_ext.openai_public as oai
    except ImportError:
        return None
    ctor = getattr(oai, "ENCODING_CONSTRUCTORS", {}).get(name)
    if ctor is None:
        return None

    def local_ranks(url, expected_hash=None):
        if raw is not None and expected_hash and hashlib.sha256(raw).hexdigest() != expected_hash:
            raise ValueError(f"tiktoken rank file for {name!r} does not match the published "
                             f"sha256 {expected_hash}; the file is damaged or not {name}")
        return ranks

    with _TIKTOKEN_LOCK, mock.patch.object(oai, "load_tiktoken_bpe", local_ranks):
        return ctor()


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE rank file. The encoding name is taken from the file name
    (``o200k_base.tiktoken.gz`` -> ``o200k_base``); known names get tiktoken's regex and special
    tokens. Unknown names fall back to the o200k regex and ``<|endoftext|>`` after the ranks."""

    kind = "tiktoken"

    def __init__(self, path: str):
        import tiktoken

        self.path = str(path)
        name = os.path.basename(self.path)
        for suf in (".gz", ".tiktoken", ".txt"):
            if name.endswith(suf):
                name = name[: -len(suf)]
        ranks, raw = _read_tiktoken_ranks(self.path)
        definition = _tiktoken_definition(name, ranks, raw)
        if definition is None:
            warnings.warn(f"{self.path}: unknown tiktoken encoding {name!r}; using the o200k_base "
                          "regex and <|endoftext|> = len(ranks)")
            base = _tiktoken_definition("o200k_base", ranks, None)  # its regex only
            definition = {"name": name, "pat_str": base["pat_str"] if base else r"\S+|\s+",
                          "mergeable_ranks": ranks, "special_tokens": {"<|endoftext|>": len(ranks)}}
        self.enc = tiktoken.Encoding(**definition)
        self.vocab_size = int(self.enc.n_vocab)
        self.eos_id = definition["special_tokens"].get("<|endoftext|>")
        self.bos_id = definition["special_tokens"].get("<|startoftext|>")
        self.pad_id = None

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.enc.encode_ordinary(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode([int(i) for i in ids])


def _sniff(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".json"):
        return "hf"
    if name.endswith((".tiktoken", ".tiktoken.gz")):
        return "tiktoken"
    if name.endswith(".model") or ".model." in name:
        return "sentencepiece"
    with open(path, "rb") as f:
        head = f.read(256)
    if head[:2] == b"\x1f\x8b":
        with gzip.open(path, "rb") as f:
            head = f.read(256)
    if head.lstrip()[:1] == b"{":
        return "hf"
    first = head.split(b"\n", 1)[0].split()
    if len(first) == 2 and first[1].isdigit():
        return "tiktoken"
    return "sentencepiece"


def load_tokenizer(path) -> Tokenizer:
    """Load a tokenizer from a local file or directory (never downloads).

    A directory must contain ``tokenizer.json`` or ``tokenizer.model``. Raises
    ``FileNotFoundError``/``ValueError`` with the path when it cannot be read.
    """
    p = Path(path)
    if p.is_dir():
        for cand in ("tokenizer.json", "tokenizer.model"):
            if (p / cand).is_file():
                p = p / cand
                break
        else:
            raise FileNotFoundError(f"{p}: directory has no tokenizer.json or tokenizer.model")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: tokenizer file not found (give a sentencepiece .model, "
                                "a tokenizer.json or a tiktoken rank file; nothing is downloaded)")
    kind = _sniff(p)
    try:
        if kind == "hf":
            return HFTokenizer(str(p))
        if kind == "tiktoken":
            return TiktokenTokenizer(str(p))
        return SentencePieceTokenizer(str(p))
    except Exception as e:  # the backends raise bare Exception/RuntimeError on bad files
        raise ValueError(f"{p}: cannot load as a {kind} tokenizer: {e}") from e


def train_sentencepiece(documents: Iterable[str], output_dir, vocab_size: int,
                        model_name: str = "tokenizer", max_sentences: int = 2_000_000,
                        num_threads: Optional[int] = None) -> Path:
    """Train a sentencepiece BPE model with byte fallback on ``documents``; returns the .model path.

    Ids: unk 0, bos 1 (``<s>``), eos 2 (``</s>``), pad 3 (``<pad>``). Text is kept verbatim
    (identity normalisation, no whitespace collapsing, ``"\\n"`` a user-defined piece) so that
    ``decode(encode(text)) == text``; anything unseen falls back to byte pieces. Documents are
    fed line by line because sentencepiece drops "sentences" longer than max_sentence_length.
    The model is written to a temporary name and renamed into place.
    """
    import sentencepiece as spm

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    def sentences():
        n = 0
        for doc in documents:
            for line in doc.split("\n"):
                if line.strip():
                    yield line
                    n += 1
                    if n >= max_sentences:
                        return

    tmp_prefix = out / f".{model_name}.tmp-{os.getpid()}"
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_prefix=str(tmp_prefix),
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n"],
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            max_sentence_length=16384,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
        final = out / f"{model_name}.model"
        os.replace(f"{tmp_prefix}.model", final)
        os.replace(f"{tmp_prefix}.vocab", out / f"{model_name}.vocab")
        return final
    finally:
        for suf in (".model", ".vocab"):
            try:
                os.remove(f"{tmp_prefix}{suf}")
            except FileNotFoundError:
                pass
