"""HTML for the playground's routing view and the Markdown of its model card: plain functions of a
RouteTrace / LoadedModel, so tests read the same markup the browser shows.

Every heatmap cell carries its facts as data attributes (data-layer, data-token, data-experts,
data-weights) and a hover title; the browser test reads those, and the page script shows a
token's route (the hidden `.mm-route` block with the same data-token) when a cell is clicked.
"""
from __future__ import annotations

import html
from typing import Optional

from megamoe.serve.routing import RouteTrace

MAX_TOKENS_SHOWN = 1024      # a wider table is unreadable and slow to draw; the load covers all tokens

CSS = """
.mm-wrap { overflow-x: auto; }
.mm-heat { border-collapse: collapse; font: 11px ui-monospace, monospace; }
.mm-heat th, .mm-heat td { border: 1px solid #fff; padding: 2px 3px; text-align: center; min-width: 18px; }
.mm-heat th.mm-tok { writing-mode: vertical-rl; transform: rotate(180deg); max-height: 90px; white-space: pre;
                     font-weight: normal; cursor: pointer; }
.mm-heat th.mm-gen { color: #b4005a; font-weight: bold; }
.mm-heat td.mm-cell { cursor: pointer; color: #111; }
.mm-heat td.mm-cell:hover, .mm-heat .mm-sel { outline: 2px solid #222; }
.mm-route { margin-top: 8px; font: 12px ui-monospace, monospace; }
.mm-route table { border-collapse: collapse; }
.mm-route td, .mm-route th { padding: 1px 6px; border-bottom: 1px solid #ddd; text-align: left; }
.mm-bar { display: inline-block; height: 9px; background: #4a7bd0; vertical-align: middle; }
.mm-note { color: #555; font-size: 12px; margin: 4px 0; }
"""

# The page script (Gradio's js_on_load for the heatmap component): clicking a cell or a token
# header shows that token's route through all layers and marks its column.
CLICK_JS = """
element.addEventListener('click', (ev) => {
  const cell = ev.target.closest('[data-token]');
  if (!cell || cell.classList.contains('mm-route')) return;
  const t = cell.dataset.token;
  element.querySelectorAll('.mm-route').forEach((r) => { r.hidden = r.dataset.token !== t; });
  element.querySelectorAll('.mm-sel').forEach((c) => c.classList.remove('mm-sel'));
  element.querySelectorAll('td[data-token="' + t + '"], th[data-token="' + t + '"]')
    .forEach((c) => c.classList.add('mm-sel'));
});
"""


def token_label(tokenizer, token_id: int) -> str:
    """What one token reads as; byte pieces that are no character on their own show as <id>."""
    text = tokenizer.decode([token_id]) if tokenizer is not None else ""
    if not text or "\ufffd" in text:
        return f"<{token_id}>"
    return text.replace("\n", "\u21b5").replace(" ", "\u00b7")


def _expert_colour(expert: int, weight: float) -> str:
    hue = (expert * 137.508) % 360           # golden-angle hues: neighbouring ids look different
    light = 92 - 45 * min(max(weight, 0.0), 1.0)
    return f"hsl({hue:.0f},70%,{light:.0f}%)"


def _esc(s) -> str:
    return html.escape(str(s), quote=True)


def heatmap_html(trace: RouteTrace, labels: list[str], n_prompt: int) -> str:
    """Layers x tokens: each cell names the token's top expert at that layer, coloured by that
    expert and shaded by its gate weight; the title lists every chosen expert and the
    shared/routed split. Below it, one hidden route table per token (shown on click)."""
    if trace.is_dense:
        return ('<div class="mm-note" id="mm-dense">This model is dense (no MoE layers): there is no routing '
                'to show. Train with n_routed_experts &gt; 0 to see experts at work.</div>')
    T = len(trace.ids)
    first = max(0, T - MAX_TOKENS_SHOWN)
    parts = [f"<style>{CSS}</style>"]
    if first:
        parts.append(f'<div class="mm-note">Showing the last {MAX_TOKENS_SHOWN} of {T} tokens.</div>')
    parts.append('<div class="mm-wrap"><table class="mm-heat" id="mm-heatmap"><thead><tr><th>layer</th>')
    for t in range(first, T):
        cls = "mm-tok mm-gen" if t >= n_prompt else "mm-tok"
        who = "generated" if t >= n_prompt else "prompt"
        parts.append(f'<th class="{cls}" data-token="{t}" data-id="{trace.ids[t]}" title="token {t} ({who}): {_esc(labels[t])}">'
                     f'{_esc(labels[t])}</th>')
    parts.append("</tr></thead><tbody>")
    for lr in trace.layers:
        parts.append(f'<tr data-layer="{lr.layer}"><th>{lr.layer}</th>')
        for t in range(first, T):
            e_K, w_K = lr.experts_TK[t].tolist(), lr.weights_TK[t].tolist()
            top = max(range(len(e_K)), key=lambda k: w_K[k])
            share = float(lr.shared_share_T[t])
            detail = ", ".join(f"{e} ({w:.2f})" for e, w in lr.pairs(t))
            title = (f"token {t} {labels[t]!r} | layer {lr.layer} | experts {detail} | "
                     f"shared {share:.0%} / routed {1 - share:.0%}")
            parts.append(f'<td class="mm-cell" data-layer="{lr.layer}" data-token="{t}" '
                         f'data-experts="{",".join(map(str, e_K))}" data-weights="{",".join(f"{w:.4f}" for w in w_K)}" '
                         f'style="background:{_expert_colour(e_K[top], w_K[top])}" title="{_esc(title)}">'
                         f"{e_K[top]}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table></div>")
    parts.append('<div class="mm-note">Cells: the top expert of each token at each MoE layer, shaded by its gate '
                 'weight; hover for all chosen experts, click a token for its route.</div>')
    parts.extend(_route_block(trace, labels, t) for t in range(first, T))
    return "".join(parts)


def _route_block(trace: RouteTrace, labels: list[str], t: int) -> str:
    rows = []
    for layer, pairs, share in trace.route_of(t):
        experts = " ".join(f'<span title="gate weight {w:.4f}">{e}&nbsp;<span class="mm-bar" '
                           f'style="width:{max(1, round(60 * w))}px"></span>&nbsp;{w:.2f}</span>' for e, w in pairs)
        rows.append(f'<tr data-layer="{layer}"><td>{layer}</td><td>{experts}</td>'
                    f"<td>{share:.0%} / {1 - share:.0%}</td></tr>")
    return (f'<div class="mm-route" data-token="{t}" hidden><b>Route of token {t}: {_esc(labels[t])}</b>'
            '<table><tr><th>layer</th><th>experts (gate weight)</th><th>shared / routed</th></tr>'
            f'{"".join(rows)}</table></div>')


def load_html(trace: RouteTrace) -> str:
    """Layers x experts: the share of this text's (token, slot) picks each expert took, with the
    layer's max/mean load (1.0 = perfectly even) and its mean shared-expert share."""
    if trace.is_dense:
        return ""
    E = trace.layers[0].n_experts
    parts = [f"<style>{CSS}</style>", '<div class="mm-wrap"><table class="mm-heat" id="mm-load"><thead><tr>'
             '<th>layer</th>', *(f"<th>{e}</th>" for e in range(E)), "<th>max/mean</th><th>shared</th></tr></thead><tbody>"]
    for lr in trace.layers:
        load = lr.load_E.tolist()
        parts.append(f'<tr data-layer="{lr.layer}"><th>{lr.layer}</th>')
        for e, x in enumerate(load):
            shade = min(1.0, x * E / 2)        # twice the even share is full colour
            parts.append(f'<td data-expert="{e}" style="background:hsl(215,70%,{95 - 50 * shade:.0f}%)" '
                         f'title="layer {lr.layer}, expert {e}: {x:.1%} of picks">{round(100 * x)}</td>')
        imbalance = max(load) * E
        parts.append(f"<td>{imbalance:.2f}</td><td>{float(lr.shared_share_T.mean()):.0%}</td></tr>")
    parts.append("</tbody></table></div><div class=\"mm-note\">Per-layer expert load over the whole text "
                 "(% of picks); shared: mean share of the MoE output from the shared experts.</div>")
    return "".join(parts)


def _fmt_params(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def model_card_md(cfg, source: str, tokenizer, state: Optional[object], device: str, dtype: str) -> str:
    """The model card: what it is, how big, how far trained, read from the checkpoint."""
    n = cfg.num_params()
    moe = cfg.n_routed_experts > 0
    rows = [("source", f"`{source}`"), ("device / dtype", f"{device} / {dtype}"),
            ("parameters", f"{_fmt_params(n['total'])} total, {_fmt_params(n['active'])} active per token"),
            ("layers", f"{cfg.num_hidden_layers} ({cfg.first_k_dense_replace} dense first)" if moe
             else f"{cfg.num_hidden_layers} (dense model)"),
            ("hidden / heads", f"{cfg.hidden_size} / {cfg.num_attention_heads}"),
            ("context", str(cfg.max_position_embeddings)), ("vocabulary", str(cfg.vocab_size))]
    if moe:
        rows.append(("experts", f"{cfg.n_routed_experts} routed (top-{cfg.num_experts_per_tok}, "
                                f"{cfg.scoring_func}), {cfg.n_shared_experts} shared"))
    if state is not None:
        rows += [("training step", str(state.step)),
                 ("last validation loss", "n/a" if state.val_loss is None else f"{state.val_loss:.4f}"),
                 ("last training loss", "n/a" if state.train_loss is None else f"{state.train_loss:.4f}")]
    else:
        rows.append(("training step", "n/a (a Hugging Face directory keeps no training state)"))
    rows.append(("tokenizer", "none" if tokenizer is None else
                 f"{tokenizer.kind}, {tokenizer.vocab_size} pieces (`{tokenizer.path}`)"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"| | |\n|---|---|\n{table}"
