"""The playground's logic without the web page: check a request, stream a continuation with the
latent KV cache, trace the routing of the whole text. The Gradio page (app.py) only wires these
to widgets, so tests drive the same code without a browser.
"""
from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from megamoe.inference import LoadedModel, StreamDecoder
from megamoe.serve import render
from megamoe.serve.routing import trace_routes


class PlaygroundError(ValueError):
    """A request the page answers with a message instead of a generation."""


@dataclass
class Request:
    prompt: str
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 0           # 0: off
    top_p: float = 1.0       # 1: off
    seed: int = -1           # < 0: a fresh random seed each time


@dataclass
class Prepared:
    ids: list[int]
    max_new_tokens: int
    notes: list[str] = field(default_factory=list)


@dataclass
class Step:
    text: str                # the continuation so far
    ids: list[int]           # prompt (as used) + generated ids so far
    n_prompt: int
    notes: list[str]
    done: bool = False
    stopped: bool = False    # ended by the stop button, not by eos or the token budget


def clean_prompt(prompt) -> tuple[str, list[str]]:
    """Text the tokenizer can take: characters that are no valid Unicode (lone surrogates from a
    broken paste or a client sending undecodable bytes) become U+FFFD, with a note."""
    if prompt is None:
        prompt = ""
    if isinstance(prompt, bytes):
        text = prompt.decode("utf-8", errors="replace")
    else:
        text = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in str(prompt))
    notes = ["The prompt held bytes that are not valid UTF-8; they were replaced with \ufffd."] \
        if "\ufffd" in text and "\ufffd" not in str(prompt) else []
    return text, notes


class Playground:
    def __init__(self, lm: LoadedModel):
        if lm.tokenizer is None:
            raise PlaygroundError(f"{lm.source} has no tokenizer; pass --tokenizer PATH")
        self.lm, self.tok, self.cfg = lm, lm.tokenizer, lm.config
        self.context = lm.config.max_position_embeddings
        # One model, many page events: a stop button's routing view may run while the cancelled
        # generation is still inside a decoding step; the routing hooks must see only their forward.
        self.lock = threading.Lock()

    def prepare(self, prompt, max_new_tokens) -> Prepared:
        """Validate a request. A prompt too long for the context keeps its last tokens (at most
        half the context when the continuation asks for more); max_new_tokens is cut to the room left."""
        text, notes = clean_prompt(prompt)
        if not text.strip():
            raise PlaygroundError("The prompt is empty: type some text to continue.")
        try:
            n_new = int(max_new_tokens)
        except (TypeError, ValueError):
            raise PlaygroundError(f"max new tokens must be a whole number, not {max_new_tokens!r}.") from None
        if n_new < 1:
            raise PlaygroundError(f"max new tokens must be at least 1 (got {n_new}).")
        ids = self.tok.encode(text)
        if n_new > self.context - 1:
            notes.append(f"max new tokens {n_new} is more than the context allows; using {self.context - 1}.")
            n_new = self.context - 1
        if len(ids) + n_new > self.context:
            keep = self.context - min(n_new, self.context // 2)
            if len(ids) > keep:
                notes.append(f"The prompt is {len(ids)} tokens and the context {self.context}: kept its last "
                             f"{keep} tokens (truncated from the left).")
                ids = ids[-keep:]
            room = self.context - len(ids)
            if n_new > room:
                notes.append(f"Only {room} new tokens fit in the context after the prompt.")
                n_new = room
        return Prepared(ids, n_new, notes)

    def stream(self, req: Request, stop: Callable[[], bool] = lambda: False) -> Iterator[Step]:
        """A Step after every token that changes the text, and a last one with done=True. Ends at
        eos, at max_new_tokens, or when `stop()` turns true (checked before every token).
        Sampling: temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""
        p = self.prepare(req.prompt, req.max_new_tokens)
        if not (0 <= float(req.temperature) <= 10):
            raise PlaygroundError(f"temperature must be between 0 and 10 (got {req.temperature}).")
        if not (0 < float(req.top_p) <= 1):
            raise PlaygroundError(f"top-p must be in (0, 1] (got {req.top_p}).")
        seed = int(req.seed) if req.seed is not None and int(req.seed) >= 0 else random.randrange(2**31)
        gen_device = self.lm.model.embed_tokens.weight.device
        gen = torch.Generator(device=gen_device).manual_seed(seed)
        decoder = StreamDecoder(self.tok)
        ids = list(p.ids)
        text = ""
        eos = self.tok.eos_id
        stream = self.lm.model.generate_stream(
            torch.tensor([p.ids], device=gen_device), p.max_new_tokens, float(req.temperature),
            int(req.top_k) or None, float(req.top_p) if req.top_p < 1 else None, eos, gen)
        stopped = False
        try:
            while not (stopped := stop()):
                with self.lock:
                    next_ids = next(stream, None)
                if next_ids is None or int(next_ids[0]) == eos:
                    break
                t = int(next_ids[0])
                ids.append(t)
                piece = decoder.push(t)
                if piece:
                    text += piece
                    yield Step(text, list(ids), len(p.ids), p.notes)
        finally:
            with self.lock:
                stream.close()
        text += decoder.flush()
        yield Step(text, ids, len(p.ids), p.notes + [f"seed {seed}"], done=True, stopped=stopped)

    def routing_view(self, ids: list[int], n_prompt: int) -> tuple[str, str]:
        """(heatmap HTML, load HTML) for the text's ids."""
        if not ids:
            return "", ""
        with self.lock:
            trace = trace_routes(self.lm.model, ids)
        labels = [render.token_label(self.tok, i) for i in ids]
        return render.heatmap_html(trace, labels, n_prompt), render.load_html(trace)
