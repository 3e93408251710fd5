"""Shared code of tools/generate.py and tools/evaluate.py: load a model, sample, score.

`load_model(path)` accepts a megamoe checkpoint (SAVE_DIR, optional tag; any ZeRO stage / EP size,
or a weights-only checkpoint from convert_from_hf) or a Hugging Face deepseek_v3/v2 directory,
and always returns the native `Transformer`, so generation uses megamoe's latent KV cache.

`evaluate_lm` computes perplexity and bits per byte over a text file or a token dataset
(megamoe.data.indexed prefix / headerless .bin) with non-overlapping windows of `seq_len`
predicted tokens, each window conditioned on its previous token.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from megamoe.config import ModelConfig
from megamoe.checkpoint import CheckpointError, load_native_state_dict
from megamoe.export import is_hf_dir, read_hf_dir


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: ModelConfig
    tokenizer: Optional[object]      # megamoe.data.tokenizer.Tokenizer or None
    source: str
    state: Optional[object] = None   # the checkpoint's TrainerState (step, losses); None for HF dirs


def resolve_device(name: str = "auto") -> torch.device:
    """auto: the GPU when there is one, else the CPU; an unavailable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu (or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU, fp32 on the CPU."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return table[name]


def load_model(path, tag: Optional[str] = None, dtype: torch.dtype = torch.float32,
               tokenizer: Optional[str] = None, device: str = "cpu", trust: bool = False) -> LoadedModel:
    """Native model + tokenizer from a megamoe checkpoint or an HF directory (`trust`: see
    megamoe/checkpoint/pickles.py)."""
    from megamoe.data.tokenizer import load_tokenizer

    path = Path(path)
    if is_hf_dir(path):
        if tag is not None:
            raise CheckpointError(f"--tag is for megamoe checkpoints; {path} is a Hugging Face directory")
        cfg, sd = read_hf_dir(path)
        state = None
        tok_path = tokenizer or next((str(path / n) for n in ("tokenizer.json", "tokenizer.model")
                                      if (path / n).exists()), None)
    else:
        sd, ck = load_native_state_dict(path, tag, trust=trust)
        cfg, state = ck.config, ck.state
        tok_path = tokenizer or ck.tokenizer
    model = cfg.build(seed=0)
    model.load_state_dict(sd, strict=True)
    model.to(device=device, dtype=dtype).eval()
    tok = None
    if tok_path:
        if not Path(tok_path).exists():
            warnings.warn(f"tokenizer {tok_path} does not exist; pass --tokenizer PATH")
        else:
            tok = load_tokenizer(str(tok_path))
    return LoadedModel(model=model, config=cfg, tokenizer=tok, source=str(path), state=state)


# ----------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------
class StreamDecoder:
    """Turns a growing list of ids into printable text increments (sentencepiece merges spaces
    and multi-byte characters across tokens, so decode the whole suffix and print the new part)."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.printed = tokenizer, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):            # an incomplete UTF-8 character: wait for the rest
            return ""
        return self._emit(text)

    def _emit(self, text: str) -> str:
        if not text.startswith(self.printed):   # a later byte changed how earlier bytes decode
            return ""
        new, self.printed = text[len(self.printed):], text
        return new

    def flush(self) -> str:
        """Whatever is left (e.g. trailing bytes that never formed a character)."""
        return self._emit(self.tok.decode(self.ids)) if self.ids else ""


def generate_text(lm: LoadedModel, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
                  top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
                  on_text: Optional[Callable[[str], None]] = None, stop_at_eos: bool = True) -> str:
    """Sample a continuation of `prompt` (no bos is added: the data pipeline adds none either).
    `on_text(piece)` receives the text as it is generated (streaming). Returns the continuation."""
    if lm.tokenizer is None:
        raise ValueError(f"{lm.source} has no tokenizer; pass --tokenizer PATH")
    tok = lm.tokenizer
    ids = tok.encode(prompt)
    if not ids:
        ids = [tok.bos_id if tok.bos_id is not None else (tok.eos_id or 0)]
    room = lm.config.max_position_embeddings - len(ids)
    if room <= 0:
        raise ValueError(f"prompt is {len(ids)} tokens; the model's context is {lm.config.max_position_embeddings}")
    max_new_tokens = min(max_new_tokens, room)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    stream = StreamDecoder(tok)
    eos = tok.eos_id if stop_at_eos else None

    def on_token(next_ids):
        t = int(next_ids[0])
        if eos is not None and t == eos:
            return
        piece = stream.push(t)
        if on_text is not None and piece:
            on_text(piece)

    device = lm.model.embed_tokens.weight.device
    out = lm.model.generate(torch.tensor([ids], device=device), max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos,
                            generator=gen, on_token=on_token)
    rest = stream.flush()
    if on_text is not None and rest:
        on_text(rest)
    new = [int(t) for t in out[0, len(ids):]]
    if eos is not None and eos in new:
        new = new[:new.index(eos)]
    return tok.decode(new)


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    tokens: int              # predicted tokens
    nll: float               # total negative log-likelihood, nats
    bytes: Optional[int]     # UTF-8 bytes those tokens decode to (None: no tokenizer for a bin)

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> Optional[float]:
        return None if not self.bytes else self.nll / math.log(2) / self.bytes

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "loss": self.loss, "perplexity": self.perplexity,
                "bytes": self.bytes, "bits_per_byte": self.bits_per_byte}


def token_stream(lm: LoadedModel, data: str, max_tokens: Optional[int] = None) -> tuple[np.ndarray, Optional[int]]:
    """Ids to score and the UTF-8 byte count of the text they stand for.

    A text file (any file that is not a token dataset) is tokenized whole, preceded by one
    context token (bos, else eos) so that every text token is predicted and the byte count is the
    file's. A token dataset (PREFIX of .bin/.idx, or a headerless .bin) is read as stored; its
    bytes come from decoding each document with the model's tokenizer, if there is one.
    """
    from megamoe.data import indexed

    p = Path(data)
    stripped = indexed._strip_suffix(data)
    is_tokens = (Path(indexed.index_file(stripped)).exists() or p.suffix == ".bin"
                 or data.rpartition(":")[2].lower() in ("uint16", "uint32", "int32"))
    if not is_tokens:
        if not p.is_file():
            raise FileNotFoundError(f"--data {data}: no such text file or token dataset (PREFIX.bin/.idx)")
        if lm.tokenizer is None:
            raise ValueError(f"{lm.source} has no tokenizer to encode {data}; pass --tokenizer PATH")
        text = p.read_text(encoding="utf-8")
        tok = lm.tokenizer
        ids = tok.encode(text)
        if max_tokens is not None and len(ids) > max_tokens:
            ids = ids[:max_tokens]
            text = tok.decode(ids)
        start = tok.bos_id if tok.bos_id is not None else tok.eos_id
        if start is None:
            raise ValueError("the tokenizer has neither bos nor eos to start the text with")
        return np.asarray([start] + ids, dtype=np.int64), len(text.encode("utf-8"))
    ds = indexed.open_token_dataset(data)
    docs, n, nbytes = [], 0, 0
    for i in range(len(ds)):
        d = np.asarray(ds[i], dtype=np.int64)
        if max_tokens is not None and n + len(d) > max_tokens + 1:
            d = d[: max_tokens + 1 - n]
        docs.append(d)
        n += len(d)
        if lm.tokenizer is not None:
            # bytes of the predicted tokens (all but the stream's first)
            body = d[1:] if i == 0 else d
            nbytes += len(lm.tokenizer.decode(body.tolist()).encode("utf-8"))
        if max_tokens is not None and n >= max_tokens + 1:
            break
    if not docs:
        raise ValueError(f"token dataset {data} is empty")
    ids = np.concatenate(docs)
    if ids.max(initial=0) >= lm.config.vocab_size:
        raise ValueError(f"{data} holds token id {int(ids.max())} >= the model's vocab_size {lm.config.vocab_size}: "
                         "it was tokenized with a different tokenizer")
    return ids, (nbytes if lm.tokenizer is not None else None)


@torch.no_grad()
def evaluate_lm(lm: LoadedModel, data: str, seq_len: Optional[int] = None, batch_size: int = 4,
                max_tokens: Optional[int] = None, progress: bool = True) -> EvalResult:
    """Perplexity and bits per byte of the model on `data` (see token_stream)."""
    from tqdm import tqdm

    ids, nbytes = token_stream(lm, data, max_tokens)
    seq_len = min(seq_len or lm.config.max_position_embeddings, lm.config.max_position_embeddings)
    n_pred = len(ids) - 1
    if n_pred <= 0:
        raise ValueError(f"{data}: fewer than 2 tokens, nothing to score")
    starts = list(range(0, n_pred, seq_len))
    nll, count = 0.0, 0
    device = lm.model.embed_tokens.weight.device

    def windows() -> Iterator[list[int]]:
        for i in range(0, len(starts), batch_size):
            yield starts[i:i + batch_size]

    bar = tqdm(total=n_pred, unit="tok", desc="evaluate", disable=not progress)
    for group in windows():
        # windows of equal length batch together; the last, shorter one runs alone
        by_len: dict[int, list[int]] = {}
        for s in group:
            by_len.setdefault(min(seq_len, n_pred - s), []).append(s)
        for L, ss in by_len.items():
            x = torch.from_numpy(np.stack([ids[s:s + L] for s in ss])).to(device)
            y = torch.from_numpy(np.stack([ids[s + 1:s + 1 + L] for s in ss])).to(device)
            logits = lm.model(x).logits.float()
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                     reduction="sum").item()
            count += y.numel()
            bar.update(y.numel())
            bar.set_postfix(ppl=f"{math.exp(nll / count):.3f}")
    bar.close()
    return EvalResult(tokens=count, nll=nll, bytes=nbytes)
