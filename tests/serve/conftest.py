"""A tiny MoE trained for a few seconds on one Shakespeare play, so the playground has real text
to show: an HF directory (with tokenizer) and its megamoe import, shared by the serve tests."""
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from megamoe.config import ModelConfig

PLAY = "tragedies__romeo-and-juliet.txt"


@dataclass
class Served:
    cfg: ModelConfig
    model: torch.nn.Module
    hf_dir: Path
    checkpoint: Path
    tokenizer: str


def train_tiny(cfg: ModelConfig, ids: list[int], steps: int = 300, seq: int = 64, batch: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    model = cfg.build(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.tensor(ids)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,)).tolist()
        x = torch.stack([data[s:s + seq] for s in starts])
        y = torch.stack([data[s + 1:s + seq + 1] for s in starts])
        model(x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> Served:
    from megamoe.data.corpus import prepare_shakespeare
    from megamoe.data.tokenizer import load_tokenizer, train_sentencepiece
    from megamoe.export import convert_from_hf
    from megamoe.hf import save_hf_dir
    from megamoe.tokenizer_export import export_tokenizer

    base = tmp_path_factory.mktemp("served")
    play = next(p for p in prepare_shakespeare(base / "plays") if p.name == PLAY)
    text = play.read_text(encoding="utf-8")
    sp = str(train_sentencepiece([text], base / "sp", vocab_size=512, num_threads=1))
    cfg = ModelConfig.load("tiny", vocab_size=512, max_position_embeddings=1024)   # room for long generations
    model = train_tiny(cfg, load_tokenizer(sp).encode(text))
    save_hf_dir(base / "hf", cfg, model.state_dict())
    export_tokenizer(sp, base / "hf", cfg)
    ck = convert_from_hf(base / "hf", base / "megamoe")
    return Served(cfg, model, base / "hf", Path(ck), sp)
