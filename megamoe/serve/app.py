"""The playground page (Gradio Blocks): generation with streaming and a stop button, the routing
view, the model card. Gradio because it streams a Python generator to the page, cancels it from a
stop button and takes custom HTML with a page script, all from Python; see README "Playground".
"""
import logging
import os
import threading
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # before gradio is imported: no calls home
import gradio as gr  # noqa: E402  (the module is imported only to serve; the CLI checks gradio first)

from megamoe.serve import render  # noqa: E402
from megamoe.serve.session import Playground, PlaygroundError, Request  # noqa: E402

log = logging.getLogger("megamoe.serve")

UPDATE_EVERY_S = 0.05   # stream at most 20 page updates a second: a fast model would flood the browser
                        # with one re-render per token, and a stop click would queue behind them

# System fonts only: the default theme would fetch web fonts, and the page must work offline.
FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def _notes_md(notes: list[str], status: str) -> str:
    return "\n".join([f"**{status}**", *(f"- {n}" for n in notes)])


def build_app(pg: Playground, card_md: str) -> gr.Blocks:
    ctx = pg.context
    # The stop button sets its page session's flag; the generation checks it before every token
    # and ends like any other (text, routing view). Gradio's `cancels` would cut the generator
    # without its last update, and races with whatever the stop handler shows.
    stop_flags: dict[str, threading.Event] = {}

    def generate(prompt, max_new, temperature, top_k, top_p, seed, request: gr.Request):
        """Streams (continuation, status, heatmap, load); the routing view comes at the end."""
        flag = stop_flags.setdefault(request.session_hash, threading.Event())
        flag.clear()
        try:
            step, shown = None, 0.0
            for step in pg.stream(Request(prompt, max_new, temperature, top_k, top_p, seed), stop=flag.is_set):
                if not step.done and time.monotonic() - shown >= UPDATE_EVERY_S:
                    shown = time.monotonic()
                    yield step.text, _notes_md(step.notes, "generating…"), gr.skip(), gr.skip()
            heat, load = pg.routing_view(step.ids, step.n_prompt)
            ended = "stopped" if step.stopped else "done"
            yield step.text, _notes_md(step.notes, f"{ended}: {len(step.ids) - step.n_prompt} new tokens"), heat, load
        except PlaygroundError as e:
            yield "", _notes_md([], str(e)), "", ""
        except Exception as e:      # the server stays up; the page says what went wrong
            log.exception("generation failed")
            yield "", _notes_md([], f"generation failed: {type(e).__name__}: {e}"), "", ""

    def stop(request: gr.Request):
        if request.session_hash in stop_flags:
            stop_flags[request.session_hash].set()

    with gr.Blocks(title="megamoe playground") as app:
        gr.Markdown("## megamoe playground")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=2):
                    prompt = gr.Textbox(label="Prompt", lines=4, elem_id="mm-prompt")
                    with gr.Row():
                        run = gr.Button("Generate", variant="primary", elem_id="mm-generate")
                        stop_button = gr.Button("Stop", elem_id="mm-stop")
                    output = gr.Textbox(label="Continuation (streamed)", lines=6, interactive=False,
                                        elem_id="mm-output")
                    status = gr.Markdown(elem_id="mm-status")
                with gr.Column(scale=1):
                    max_new = gr.Slider(1, ctx - 1, value=min(64, ctx - 1), step=1, label="max new tokens",
                                        elem_id="mm-max-new")
                    temperature = gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="temperature (0 = greedy)")
                    top_k = gr.Slider(0, 200, value=40, step=1, label="top-k (0 = off)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p (1 = off)")
                    seed = gr.Number(value=0, precision=0, label="seed (-1 = random)", elem_id="mm-seed")
            gr.Markdown("### Routing: top expert per token and MoE layer")
            heatmap = gr.HTML(elem_id="mm-heatmap-box", js_on_load=render.CLICK_JS)
            gr.Markdown("### Expert load per layer")
            load = gr.HTML(elem_id="mm-load-box")
        with gr.Tab("Model card"):
            gr.Markdown(card_md, elem_id="mm-card")
        inputs = [prompt, max_new, temperature, top_k, top_p, seed]
        outputs = [output, status, heatmap, load]
        run.click(generate, inputs, outputs, concurrency_id="model")
        prompt.submit(generate, inputs, outputs, concurrency_id="model")
        stop_button.click(stop, None, None, queue=False)
    return app


def launch(app: gr.Blocks, host: str, port: int, block: bool = True):
    app.queue(default_concurrency_limit=1)   # one model: requests take turns
    return app.launch(server_name=host, server_port=port, ssr_mode=False, show_error=True,
                      prevent_thread_lock=not block, theme=gr.themes.Default(**FONTS), quiet=False)
