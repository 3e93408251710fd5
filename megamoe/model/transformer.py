"""The causal LM: embedding, N pre-norm blocks (MLA + dense MLP or MoE), final norm, LM head."""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from megamoe import kernels
from megamoe.config import ModelConfig
from megamoe.kernels.attention import Documents
from megamoe.model.attention import MLA, LatentCache
from megamoe.model.layers import MLP, RMSNorm, RotaryEmbedding
from megamoe.model.moe import AuxLossScaler, MoE, Router

IGNORE_INDEX = -100


class ModelOutput(dict):
    """The model's outputs: a dict with attribute access, as transformers' ModelOutput.

    A dict, not a dataclass, because DeepSpeed ZeRO-3 finds (and wraps in place) the tensors a
    module returns only inside tensors, tuples, lists and dicts; its backward hooks re-gather the
    partitioned weights through them. Fields left None are absent from the dict.
      logits             [B, S, V]
      loss               next-token cross-entropy (labels given); the router and MTP losses
                         join its gradient through AuxLossScaler, not its value
      aux_loss, z_loss   sums over MoE layers of the weighted balance and z losses (detached)
      mtp_loss           mtp_loss_weight * mean MTP cross-entropy over the depths (detached)
      tokens_per_expert  [L_moe, E] routed (token, slot) pairs in this forward
      dropped_fraction   [L_moe] share of assignments over capacity (0 when dropless)
    """
    FIELDS = ("logits", "loss", "aux_loss", "z_loss", "mtp_loss", "tokens_per_expert", "dropped_fraction")

    def __init__(self, logits: torch.Tensor, **fields):
        super().__init__()
        self.logits = logits
        for name, value in fields.items():
            setattr(self, name, value)

    def __getattr__(self, name):
        if name in self:
            return self[name]
        if name in ModelOutput.FIELDS:
            return None
        raise AttributeError(name)

    def __setattr__(self, name, value):
        if name not in ModelOutput.FIELDS:
            raise AttributeError(f"ModelOutput has no field {name!r}")
        if value is None:
            self.pop(name, None)
        else:
            self[name] = value


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = MoE(cfg) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x_BSH, cos, sin, cache: Optional[LatentCache] = None, start_pos: int = 0,
                documents: Optional[Documents] = None):
        x_BSH = x_BSH + self.attn(self.attn_norm(x_BSH), cos, sin, cache, start_pos, documents)
        if self.is_moe:
            # ffn may be an expert-parallel replacement of MoE; both keep our Router at .router
            self.ffn.router.seq_len = x_BSH.shape[1]
        return x_BSH + self.ffn(self.ffn_norm(x_BSH))


class MTPModule(nn.Module):
    """DeepSeek-V3 multi-token prediction, depth k: combine the previous depth's hidden state at i
    with the embedding of token i+k, run one more block, predict token i+k+1 with the shared head.
    Names follow DeepSeek's release (enorm, hnorm, eh_proj, a block, a final norm)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = Block(cfg, layer_idx)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h_BSH, next_emb_BSH, cos, sin, documents: Optional[Documents] = None):
        x = self.eh_proj(torch.cat([self.hnorm(h_BSH), self.enorm(next_emb_BSH)], dim=-1))
        return self.block(x, cos, sin, documents=documents)


class LMHead(nn.Linear):
    """The output projection; given labels it returns the mean cross-entropy instead of logits,
    computed in token chunks (kernels.linear_cross_entropy) so [tokens, vocab] fp32 logits never
    exist. A module call either way, so ZeRO-3's hooks gather the weight for forward and backward."""

    def forward(self, h_BSH: torch.Tensor, labels_BS: Optional[torch.Tensor] = None) -> torch.Tensor:
        if labels_BS is None:
            return super().forward(h_BSH)
        return kernels.linear_cross_entropy(h_BSH.reshape(-1, h_BSH.shape[-1]), self.weight, labels_BS.reshape(-1),
                                            IGNORE_INDEX)


class Transformer(nn.Module):
    """Build it with `ModelConfig.build` (initial values from `megamoe.model.init`); the constructor
    only lays out the modules, on the meta device there."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.gradient_checkpointing = False
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            # one Parameter under two names, as transformers ties; logits still go through the
            # lm_head module so ZeRO-3's module hooks gather the weight for forward and backward
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg)
        # training-only: excluded from Hugging Face export (convert_to_hf --drop-mtp says so)
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.num_hidden_layers + k)
                                 for k in range(cfg.num_nextn_predict_layers))

    def routers(self) -> Iterator[tuple[int, Router]]:
        """(layer index, Router) of every MoE block; MTP blocks count as layers L, L+1, ..."""
        blocks = [*self.layers, *(m.block for m in self.mtp)]
        for i, layer in enumerate(blocks):
            if layer.is_moe:
                yield i, layer.ffn.router

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def attention_modules(self) -> list:
        """Every MLA module (main layers, then MTP blocks), in a fixed order."""
        return [layer.attn for layer in self.layers] + [m.block.attn for m in self.mtp]

    def set_track_max_logit(self, enabled: bool = True) -> None:
        """Record each head's max pre-softmax logit during training forwards (for QK-clip)."""
        for attn in self.attention_modules():
            attn.track_max_logit = enabled

    @torch.no_grad()
    def pop_max_logits(self) -> torch.Tensor:
        """[L_attn, N] max logits since the last call, then reset (-inf where nothing ran)."""
        out = torch.stack([attn.max_logit.clone() for attn in self.attention_modules()])
        for attn in self.attention_modules():
            attn.max_logit.fill_(float("-inf"))
        return out

    # ------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                caches: Optional[list[LatentCache]] = None, start_pos: int = 0,
                documents: Optional[Documents] = None) -> ModelOutput:
        """`documents` (kernels.attention.Documents): packed documents attend within themselves."""
        B, S = input_ids.shape
        positions = torch.arange(start_pos, start_pos + S, device=input_ids.device).unsqueeze(0)
        cos, sin = self.rotary(positions)
        h = self.embed_tokens(input_ids)
        for i, router in self.routers():   # the main layers' routers count token id -> experts (specialisation)
            router.token_ids = input_ids.detach() if i < len(self.layers) else None
        for i, layer in enumerate(self.layers):
            cache = caches[i] if caches is not None else None
            if self.gradient_checkpointing and self.training and cache is None:
                h = checkpoint(layer, h, cos, sin, None, 0, documents, use_reentrant=False)
            else:
                h = layer(h, cos, sin, cache, start_pos, documents)
        if labels is None:
            out = ModelOutput(logits=self.lm_head(self.norm(h)))
        else:
            # the loss without full-vocab logits (LMHead); logits are not returned with labels
            out = ModelOutput(logits=None, loss=self.lm_head(self.norm(h), labels))
            if len(self.mtp) and self.training and caches is None:
                mtp_loss = self._mtp_loss(h, labels, cos, sin, documents)
                out.mtp_loss = mtp_loss.detach()
                # its gradient joins through the loss, like the router losses: loss stays the LM loss
                out.loss = AuxLossScaler.apply(out.loss, mtp_loss)
        routers = [r for _, r in self.routers()]
        if routers:
            out.tokens_per_expert = torch.stack([r.last_tokens_per_expert for r in routers])
            out.dropped_fraction = torch.stack([r.last_dropped_fraction.to(h.device) for r in routers])
            if self.training:
                out.aux_loss = sum(r.last_aux_loss.to(h.device) for r in routers)
                out.z_loss = sum(r.last_z_loss.to(h.device) for r in routers)
        return out

    def _mtp_loss(self, h_BSH: torch.Tensor, labels_BS: torch.Tensor, cos, sin,
                  documents: Optional[Documents] = None) -> torch.Tensor:
        """Depth k predicts token i+k+1 from position i. Sequences keep their length: the last k
        positions have no target (ignored) and, attention being causal, cannot affect the others."""
        losses = []
        for k, module in enumerate(self.mtp, start=1):
            # labels[:, i] is token i+1; depth k embeds token i+k and predicts token i+k+1
            next_ids = labels_BS.roll(-(k - 1), dims=1).clamp(min=0)
            targets = labels_BS.roll(-k, dims=1).clone()
            targets[:, -k:] = IGNORE_INDEX
            h_BSH = module(h_BSH, self.embed_tokens(next_ids), cos, sin, documents)
            losses.append(self.lm_head(module.norm(h_BSH), targets))
        return self.cfg.mtp_loss_weight * torch.stack(losses).mean()

    # ------------------------------------------------------------------------------------------
    def new_caches(self, batch: int, max_len: int) -> list[LatentCache]:
        p = self.embed_tokens.weight
        return [LatentCache.empty(self.cfg, batch, max_len, p.device, p.dtype) for _ in self.layers]

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 on_token: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
        """Sample with the latent KV cache. temperature 0 is greedy. Prompts in a batch have equal
        length. `on_token(next_ids [B])` is called for each new token (streaming). Stops early
        when every row has produced `eos_token_id`. Returns prompt + generated ids."""
        new = []
        for next_ids in self.generate_stream(input_ids, max_new_tokens, temperature, top_k, top_p,
                                             eos_token_id, generator):
            new.append(next_ids[:, None])
            if on_token is not None:
                on_token(next_ids)
        return torch.cat([input_ids, *new], dim=1)

    @torch.no_grad()
    def generate_stream(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: Optional[int] = None, top_p: Optional[float] = None,
                        eos_token_id: Optional[int] = None,
                        generator: Optional[torch.Generator] = None) -> Iterator[torch.Tensor]:
        """generate() as an iterator of next_ids [B], one per step: a consumer that stops iterating
        (a stop button) stops the computation. Rows that produced eos keep producing eos."""
        B, S = input_ids.shape
        total = S + max_new_tokens
        if total > self.cfg.max_position_embeddings:
            raise ValueError(f"prompt ({S}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_position_embeddings ({self.cfg.max_position_embeddings})")
        was_training = self.training
        self.eval()
        try:
            caches = self.new_caches(B, total)
            done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
            logits = self(input_ids, caches=caches, start_pos=0).logits[:, -1]
            for step in range(max_new_tokens):
                next_ids = sample_next(logits, temperature, top_k, top_p, generator)
                if eos_token_id is not None:
                    next_ids = torch.where(done, torch.full_like(next_ids, eos_token_id), next_ids)
                    done |= next_ids == eos_token_id
                yield next_ids
                if done.all() or step == max_new_tokens - 1:
                    break
                logits = self(next_ids[:, None], caches=caches, start_pos=S + step).logits[:, -1]
        finally:
            self.train(was_training)


def sample_next(logits_BV: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Greedy at temperature 0; else top-k, then nucleus (top-p) filtering, then sampling."""
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    logits = logits_BV.float() / temperature
    if top_k is not None and top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        drop = drop_sorted.scatter(1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
