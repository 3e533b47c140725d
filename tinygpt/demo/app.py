"""The gradio Blocks of the demo: the layout and the events that connect it to `Handlers`.

    demo = build_demo(engine, cfg)          # engine: a ChatEngine, cfg: its LaunchConfig
    launch(demo, cfg, host="127.0.0.1", port=None, share=False)

Contract:
* layout: a messages-format gr.Chatbot, a gr.MultimodalTextbox (several images per message), Stop / Regenerate /
  Clear; on the side the task selector, the image view (answers' boxes; two clicks mark the [identify] region), the
  region text, the generation settings; examples below;
* while an answer is written the textbox and Regenerate are locked (Stop and Clear end the answer and unlock them);
* named API endpoints (gradio_client): ``/add_message`` (message, history, task, region) -> (textbox, history) and
  ``/respond`` (history, max_new_tokens, temperature, top_p, repetition_penalty, seed) -> (history, view),
  streamed (settings are checked by the handler against the sliders' ranges: a value outside is a notice, not
  gradio's traceback); ``/regenerate`` (history) -> (history, textbox), the textbox locked (nothing to regenerate:
  a warning, no change, and the UI unlocked at once);
* generation events share one concurrency slot (``concurrency_id="engine"``, limit 1), the queue holds at most
  ``limits.queue_size`` waiting events (one more is refused with gradio's "queue is full" message); UI-only events
  skip the queue; neither typing nor attaching images takes a place in it (newly attached images start the
  engine's head start, `prepare`, in a background thread that waits for the engine's lock);
* `launch` never makes a public link unless ``share`` is True, caps uploads at ``limits.max_upload_bytes`` and lets
  gradio serve the shipped example images.
"""

from __future__ import annotations

import gradio as gr

from ..chat import ChatEngine
from ..chat.launch import LaunchConfig
from .conversation import NO_TASK, TASK_CHOICES
from .examples import EXAMPLES_DIR, example_rows
from .handlers import EMPTY_MESSAGE, Handlers

TITLE = "TinyGPT-V demo"
UI_ONLY = dict(api_visibility="private", queue=False)


def _header(engine: ChatEngine, cfg: LaunchConfig) -> str:
    limits = cfg.limits
    return (f"## {TITLE}: `{cfg.name}`\n"
            f"{engine.name}, context {engine.context_length} positions; up to {limits.max_images} images per "
            f"message. Pick a task to prefix its tag, attach images with the clip, ask. "
            "For `[identify]`, click two opposite corners of a region on the image.")


def _as_sent(component: gr.components.Component) -> gr.components.Component:
    """The component, its value handed to the handler as sent, unchecked: gradio's own checks (Slider.preprocess:
    the range, raising gr.Error; Number.preprocess: rounding, which NaN, Infinity or a string break) failed a value
    sent through the API with a traceback on the console, before Handlers.respond could answer it with a notice.
    The browser's controls keep their ranges. (An instance attribute: a subclass of a gradio component makes gradio
    write a .pyi stub beside this file.)"""
    component.preprocess = lambda payload: payload  # type: ignore[method-assign]
    return component


def _settings(cfg: LaunchConfig, h: Handlers) -> list[gr.components.Component]:
    gen, ranges = cfg.generation, h.ranges
    return [_as_sent(c) for c in (
        gr.Slider(*ranges["max_new_tokens"], value=gen.max_new_tokens, step=1, label="Max new tokens"),
        gr.Slider(*ranges["temperature"], value=gen.temperature, step=0.05, label="Temperature (0: greedy)"),
        gr.Slider(*ranges["top_p"], value=gen.top_p, step=0.05, label="Top-p (sampling only)"),
        gr.Slider(*ranges["repetition_penalty"], value=gen.repetition_penalty, step=0.05,
                  label="Repetition penalty (1: none)"),
        gr.Number(value=gen.seed, precision=0, label="Seed (sampling only; empty: a new one each time)"),
    )]


def build_demo(engine: ChatEngine, cfg: LaunchConfig, handlers: Handlers | None = None) -> gr.Blocks:
    h = handlers or Handlers(engine, cfg)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:  # gradio's telemetry would post to gradio.app
        gr.Markdown(_header(engine, cfg))
        current = gr.State(None)  # path of the image the view shows
        attached = gr.State(None)  # the images attached to the textbox and the history length prepare was asked at
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", elem_id="chat", height=520, buttons=["copy"],
                                     feedback_options=None, group_consecutive_messages=False,
                                     placeholder="Attach an image, ask about it, or pick an example below.")
                # no file_types: gradio would refuse a non-image in preprocess, before add_message, with its own
                # traceback on the console; add_message's upload checks refuse it with a notice instead
                box = gr.MultimodalTextbox(elem_id="message", file_count="multiple", sources=["upload"],
                                           show_label=False,
                                           placeholder="Ask about the image (attach one or more with the clip)")
                with gr.Row():
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    regenerate = gr.Button("Regenerate", elem_id="regenerate")
                    clear = gr.Button("Clear", elem_id="clear")
            with gr.Column(scale=2):
                task = gr.Radio(list(TASK_CHOICES), value=NO_TASK, label="Task (prefixes its tag)", elem_id="task")
                view = gr.Image(label="Image: the answer's boxes; click two corners to mark a region", type="pil",
                                format="png", interactive=False, elem_id="view", buttons=["download", "fullscreen"])
                region = gr.Textbox(label="Region for [identify]: x1, y1, x2, y2 in pixels", elem_id="region",
                                    placeholder="click two corners on the image, or type them")
                with gr.Accordion("Generation", open=False):
                    settings = _settings(cfg, h)
        gr.Examples(example_rows(), inputs=[box, task, region], label="Examples (synthetic shapes: the tiny "
                                                                     "model's world)")

        answer_io = dict(fn=h.respond, inputs=[chatbot, *settings], outputs=[chatbot, view, current],
                         concurrency_id="engine", concurrency_limit=1)
        sent = box.submit(h.add_message, [box, chatbot, task, region], [box, chatbot], api_name="add_message",
                          concurrency_limit=None, show_progress="hidden")
        # while an answer is written Regenerate is locked with the textbox (Stop first): clicked then, it let that
        # answer run to its end, whose unlocking freed the textbox while the new answer still waited for the engine
        locked = dict(fn=lambda: gr.Button(interactive=False), outputs=[regenerate], **UI_ONLY)
        unlocked = dict(fn=lambda: (gr.MultimodalTextbox(interactive=True), gr.Button(interactive=True)),
                        outputs=[box, regenerate], **UI_ONLY)
        box.submit(**locked)  # at once, beside add_message (after it, a click could slip in before the lock)
        answered = sent.success(**answer_io, api_name="respond")
        answered.then(**unlocked)
        sent.failure(**unlocked)
        # queued (no engine slot), so that "nothing to regenerate" is a gr.Warning toast: unqueued events show none
        again = regenerate.click(h.regenerate, [chatbot], [chatbot, box], api_name="regenerate", concurrency_limit=None,
                                 show_progress="hidden")
        regenerate.click(**locked)
        again.failure(**unlocked)
        # nothing to regenerate ends the chain here (a quiet error): the answer step would wait for the engine's slot
        # behind another session's answer, keeping Regenerate locked that long
        checked = again.success(h.regenerable, [chatbot], None, show_progress="hidden", **UI_ONLY)
        checked.failure(**unlocked)
        again_answered = checked.success(**answer_io, api_visibility="undocumented")
        again_answered.then(**unlocked)
        stop.click(**unlocked, cancels=[answered, again_answered])
        for cleared in (clear.click, chatbot.clear):  # the button and the chat's own bin
            cleared(lambda: ([], gr.MultimodalTextbox(value=EMPTY_MESSAGE, interactive=True), None, "", None,
                             gr.Button(interactive=True)),
                    outputs=[chatbot, box, view, region, current, regenerate], cancels=[answered, again_answered],
                    **UI_ONLY)

        box.change(h.follow, [box, chatbot, region, current], [view, current], **UI_ONLY)
        # the engine's head start only when new images are attached, started by h.attached in a background thread:
        # a prepare queued on every keystroke held a place in the bounded queue while another answer was written,
        # so that sending was refused as "queue full"; queued only on attaching, it still held the place for the
        # whole of that answer (and the queued step that noticed the images took one too)
        box.change(h.attached, [box, chatbot, attached], [attached], **UI_ONLY)
        region.change(h.redraw, [box, chatbot, region], [view], **UI_ONLY)
        view.select(h.pick, [box, chatbot, region], [region], **UI_ONLY)
    return demo


def launch(demo: gr.Blocks, cfg: LaunchConfig, host: str = "127.0.0.1", port: int | None = None,
           share: bool = False, share_hint: str = "--share", quiet: bool = False, prevent_thread_lock: bool = False,
           **options):
    """Queue (bounded; one generation at a time) and serve; `options` go to gradio's launch. Gradio's own start-up
    lines are replaced by `serving_lines` (gradio's advise ``share=True`` in ``launch()``, which a user of the
    command cannot set; `share_hint` is the flag that does it)."""
    demo.queue(max_size=cfg.limits.queue_size, default_concurrency_limit=1)
    try:
        started = demo.launch(server_name=host, server_port=port, share=share,
                              max_file_size=cfg.limits.max_upload_bytes, allowed_paths=[str(EXAMPLES_DIR)], quiet=True,
                              prevent_thread_lock=True, **options)
        if not quiet:
            print("\n".join(serving_lines(demo.local_url, demo.share_url, share, share_hint)), flush=True)
        if not prevent_thread_lock:
            demo.block_thread()  # gradio's: Ctrl-C (SIGTERM too, tinygpt.chat.launch) closes the server there
    except KeyboardInterrupt:  # one that came before block_thread (the server up, gradio still starting): the same
        if prevent_thread_lock:
            raise
        print("Keyboard interruption (or SIGTERM): closing the demo.", flush=True)
        demo.close()
        return None
    return started


def serving_lines(local_url: str, share_url: str | None, share: bool, share_hint: str = "--share") -> list[str]:
    """What the demo says once it listens: its local address, and its public link or how to get one."""
    lines = [f"* Running on local URL:  {local_url}"]
    if share_url:
        lines.append(f"* Public link (anyone who has it can use the demo; gradio keeps it up to a week): {share_url}")
    elif share:
        lines.append("* No public link: gradio could not make one (is this machine online?); the local URL works")
    else:
        lines.append(f"* No public link; {share_hint} makes one (*.gradio.live)")
    return lines
