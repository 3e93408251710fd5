"""The playground without a browser: routing traces against the router itself, streaming
generation, the checks on bad requests, the rendered markup and the model card."""
import html.parser

import pytest
import torch

from megamoe.config import ModelConfig
from megamoe.inference import LoadedModel, load_model
from megamoe.model.moe import Router
from megamoe.serve import render
from megamoe.serve.routing import trace_routes
from megamoe.serve.session import Playground, PlaygroundError, Request, clean_prompt

PROMPT = "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?"


def router_oracle(model, ids):
    """What each MoE layer's Router.route returns for `ids`, in layer order (the router itself,
    not the hooks the playground uses)."""
    seen, route = [], Router.route

    def recording(self, x_TH, expert_bias=None):
        r = route(self, x_TH, expert_bias)
        seen.append((r.indices_TK.clone(), r.weights_TK.detach().clone()))
        return r
    Router.route = recording
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        Router.route = route
    return seen


@pytest.fixture(scope="module")
def lm(served):
    return load_model(served.checkpoint)


def test_trace_is_what_the_router_chose(lm):
    ids = lm.tokenizer.encode(PROMPT)
    trace = trace_routes(lm.model, ids)
    moe_layers = [i for i in range(lm.config.num_hidden_layers) if lm.config.is_moe_layer(i)]
    assert [lr.layer for lr in trace.layers] == moe_layers
    for lr, (indices, weights) in zip(trace.layers, router_oracle(lm.model, ids)):
        assert torch.equal(lr.experts_TK, indices) and torch.allclose(lr.weights_TK, weights)
        assert torch.allclose(lr.load_E, torch.bincount(indices.flatten(), minlength=lm.config.n_routed_experts)
                              / indices.numel())


def test_shared_share_is_the_shared_experts_part_of_the_output(lm):
    ids = lm.tokenizer.encode(PROMPT)
    trace = trace_routes(lm.model, ids)
    inputs = {}
    hooks = [layer.ffn.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0][0]))
             for i, layer in enumerate(lm.model.layers) if layer.is_moe]
    with torch.no_grad():
        lm.model(torch.tensor([ids]))
        for h in hooks:
            h.remove()
        for lr in trace.layers:
            moe, x = lm.model.layers[lr.layer].ffn, inputs[lr.layer]
            shared = moe.shared_experts(x).norm(dim=-1)
            routed = (moe(x[None])[0] - moe.shared_experts(x)).norm(dim=-1)
            assert torch.allclose(lr.shared_share_T, shared / (shared + routed), atol=1e-4)
    assert all(0 < float(lr.shared_share_T.mean()) < 1 for lr in trace.layers)
    route = trace.route_of(3)
    assert [layer for layer, _, _ in route] == [lr.layer for lr in trace.layers]
    assert all(len(pairs) == lm.config.num_experts_per_tok and pairs[0][1] >= pairs[-1][1] for _, pairs, _ in route)


def test_dense_model_has_no_routes_and_the_page_says_so(lm):
    cfg = ModelConfig.load("tiny", vocab_size=512, n_routed_experts=0)
    trace = trace_routes(cfg.build(seed=0), [5, 6, 7])
    assert trace.is_dense
    assert 'id="mm-dense"' in render.heatmap_html(trace, ["a", "b", "c"], 1) and render.load_html(trace) == ""


class Cells(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells, self.heads = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "td" and "data-experts" in a:
            self.cells.append(a)
        if tag == "th" and "data-id" in a:
            self.heads.append(a)


def test_heatmap_markup_carries_the_trace(lm):
    ids = lm.tokenizer.encode(PROMPT)
    trace = trace_routes(lm.model, ids)
    labels = [render.token_label(lm.tokenizer, i) for i in ids]
    p = Cells()
    p.feed(render.heatmap_html(trace, labels, n_prompt=5))
    assert [int(h["data-id"]) for h in p.heads] == ids
    assert [("mm-gen" in h["class"]) for h in p.heads] == [t >= 5 for t in range(len(ids))]
    assert len(p.cells) == len(trace.layers) * len(ids)
    for c in p.cells:
        lr = next(lr for lr in trace.layers if lr.layer == int(c["data-layer"]))
        t = int(c["data-token"])
        assert c["data-experts"] == ",".join(map(str, lr.experts_TK[t].tolist()))
        assert f"layer {lr.layer}" in c["title"] and "shared" in c["title"]


def test_token_labels_show_bytes_and_whitespace(lm):
    tok = lm.tokenizer
    byte_id = next(i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i]) or not tok.decode([i]))
    assert render.token_label(tok, byte_id) == f"<{byte_id}>"
    labels = [render.token_label(tok, i) for i in tok.encode("ROMEO:\n  What, ho!\n\nJULIET:")]
    assert labels and all(lab and " " not in lab and "\n" not in lab for lab in labels)
    assert "\u21b5" in "".join(labels)     # a newline shows as a visible mark


def test_stream_matches_generate_and_stops_when_asked(lm):
    ids = lm.tokenizer.encode(PROMPT)
    x = torch.tensor([ids])
    full = lm.model.generate(x, 20, temperature=0.9, top_k=30, generator=torch.Generator().manual_seed(4))
    stream = lm.model.generate_stream(x, 20, temperature=0.9, top_k=30, generator=torch.Generator().manual_seed(4))
    assert [int(t[0]) for t in stream] == full[0, len(ids):].tolist()
    calls = []
    hook = lm.model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        first = lm.model.generate_stream(x, 50, temperature=0.0)
        next(first)
        next(first)
        first.close()        # a consumer that stops iterating stops the computation
    finally:
        hook.remove()
    assert len(calls) == 2 and not lm.model.training


def test_session_streams_a_continuation_the_tokenizer_agrees_with(lm):
    pg = Playground(lm)
    steps = list(pg.stream(Request(PROMPT, max_new_tokens=40, temperature=0.8, top_k=40, seed=1)))
    last = steps[-1]
    assert last.done and all(not s.done for s in steps[:-1]) and len(steps) > 2
    assert all(last.text.startswith(s.text) for s in steps)
    assert last.ids[:last.n_prompt] == lm.tokenizer.encode(PROMPT)
    assert last.text == lm.tokenizer.decode(last.ids[last.n_prompt:])
    again = list(pg.stream(Request(PROMPT, max_new_tokens=40, temperature=0.8, top_k=40, seed=1)))[-1]
    assert again.ids == last.ids and "seed 1" in last.notes
    heat, load = pg.routing_view(last.ids, last.n_prompt)
    assert heat.count('class="mm-route"') == len(last.ids) and load.count("<tr data-layer") == 2


def test_stop_ends_the_stream_with_the_text_so_far(lm):
    calls = []

    def stop():          # the stop button is pressed while the 6th token is being made
        calls.append(1)
        return len(calls) > 6
    steps = list(Playground(lm).stream(Request(PROMPT, 100, temperature=0.0), stop=stop))
    last = steps[-1]
    assert last.done and last.stopped and len(last.ids) - last.n_prompt == 6
    assert last.text == lm.tokenizer.decode(last.ids[last.n_prompt:])
    done = list(Playground(lm).stream(Request(PROMPT, 3, temperature=0.0)))[-1]
    assert not done.stopped and done.ids == last.ids[:len(done.ids)]


@pytest.mark.parametrize("prompt", ["", "   \n", None])
def test_empty_prompt_is_refused(lm, prompt):
    with pytest.raises(PlaygroundError, match="empty"):
        Playground(lm).prepare(prompt, 10)


@pytest.mark.parametrize("max_new", [0, -3, "many", None])
def test_bad_max_new_tokens_is_refused(lm, max_new):
    with pytest.raises(PlaygroundError, match="max new tokens"):
        Playground(lm).prepare(PROMPT, max_new)


def test_absurd_max_new_tokens_is_cut_to_the_context(lm):
    p = Playground(lm).prepare(PROMPT, 10**9)
    ctx = lm.config.max_position_embeddings
    assert len(p.ids) + p.max_new_tokens == ctx and any("more than the context" in n for n in p.notes)


def test_long_prompt_keeps_its_end(lm):
    ctx = lm.config.max_position_embeddings
    long = " ".join(f"word{i}" for i in range(1000))
    ids = lm.tokenizer.encode(long)
    assert len(ids) > ctx
    p = Playground(lm).prepare(long, 32)
    assert p.ids == ids[-(ctx - 32):] and p.max_new_tokens == 32
    assert any("truncated from the left" in n for n in p.notes)
    steps = list(Playground(lm).stream(Request(long, 32, temperature=0.0)))
    assert len(steps[-1].ids) <= ctx


def test_undecodable_prompt_is_repaired_with_a_note(lm):
    text, notes = clean_prompt("Romeo \udcff\ud800 and")
    assert text == "Romeo \ufffd\ufffd and" and notes
    text, notes = clean_prompt(b"Romeo \xff\xfe and")
    assert text.startswith("Romeo \ufffd") and notes
    assert clean_prompt("plain \ufffd kept") == ("plain \ufffd kept", [])
    p = Playground(lm).prepare("Romeo \udcff", 5)
    assert p.ids and p.notes


def test_bad_sampling_values_are_refused(lm):
    pg = Playground(lm)
    with pytest.raises(PlaygroundError, match="top-p"):
        list(pg.stream(Request(PROMPT, 5, top_p=0)))
    with pytest.raises(PlaygroundError, match="temperature"):
        list(pg.stream(Request(PROMPT, 5, temperature=-1)))


def test_model_without_tokenizer_is_refused(lm):
    with pytest.raises(PlaygroundError, match="--tokenizer"):
        Playground(LoadedModel(lm.model, lm.config, None, "somewhere"))


def test_model_card_reads_the_checkpoint(lm, served):
    from megamoe.checkpoint.format import TrainerState
    card = render.model_card_md(lm.config, lm.source, lm.tokenizer, lm.state, "cpu", "float32")
    n = lm.config.num_params()
    assert lm.state is not None and "| training step | 0 |" in card
    assert f"{n['total'] / 1e3:.2f}K total" in card or f"{n['total'] / 1e6:.2f}M total" in card
    assert "8 routed (top-2, sigmoid), 1 shared" in card and f"{lm.tokenizer.kind}, 512 pieces" in card
    state = TrainerState(step=1200, model_config=lm.config.to_dict(), val_loss=2.5, train_loss=2.25)
    card = render.model_card_md(lm.config, "x", lm.tokenizer, state, "cuda", "bfloat16")
    assert "| training step | 1200 |" in card and "| last validation loss | 2.5000 |" in card
    hf = load_model(served.hf_dir)
    assert "n/a (a Hugging Face directory" in render.model_card_md(hf.config, "x", hf.tokenizer, hf.state, "cpu", "f")


@pytest.mark.parametrize("what", ["missing", "not-a-model"])
def test_serve_refuses_a_path_that_is_not_a_model(tmp_path, capsys, what):
    from megamoe.cli.serve import main
    path = tmp_path / "nothing"
    if what == "not-a-model":
        path.mkdir()
        (path / "notes.txt").write_text("hello")
    assert main(["--model", str(path), "--port", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("serve: error:") and str(path) in err
