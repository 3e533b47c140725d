"""The demo in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright's Python package.

What is real: the gradio app of tinygpt.demo served in-process, the browser, uploads, the task selector, the
examples, streaming, the ChatEngine with its PyTorch backend, the box parsing and drawing, and the model's answers.
What is not the shipped model: the model is the tiny preset with random weights whose output layer (the LM head)
is edited in this session, in closed form (one least-squares solve, ~2 s; `taught_engine`), to give two answers
about the first example image: ``[vqa] how many shapes are there?`` -> ``3`` and ``[refer] small green triangle``
-> ``<p>small green triangle</p> {<39><38><65><65>}`` (the synthetic data's wording). It has memorised those two
token sequences, not learnt to see: other questions get one of them or nonsense. A random model never answers with a
box; the trained tiny stage-4 model (5 minutes of `python train.py`) is not in a fresh clone, and teaching the random
one by gradient steps took 50 steps and over a minute on 2 busy cores (measured while writing this test).

The browser uploads an image and asks, sees the refer answer stream in and its box drawn (in the chat and on the
image view, checked pixel by pixel), marks an [identify] region with two clicks, and attaches a text file named .png
and sees the notice. It takes a screenshot; with TINYGPT_DEMO_SCREENSHOT=1 it replaces docs/images/demo.png (the one
docs/demo.md and the README show), so an ordinary run leaves the checkout as it was.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_demo import demo_config, free_port
from tinygpt.chat import ChatEngine, GenerationSettings
from tinygpt.demo.drawing import PALETTE
from tinygpt.demo.examples import example_path, example_scenes, refer_answer
from tinygpt.demo.handlers import Handlers
from tinygpt.tiny.synthetic import texts

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "images" / "demo.png"
IMAGE = str(example_path(0))
SCENE = example_scenes()[0]
PHRASE = texts.phrase(SCENE.objects[-1])  # "small green triangle", the examples' refer row
LESSONS = [("[vqa] how many shapes are there?", str(len(SCENE.objects))),
           (f"[refer] {PHRASE}", refer_answer(SCENE))]
MARGIN = 10.0  # logits by which each taught token beats the next best

if not Path(CHROMIUM).is_file():
    pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium); the browser test drives that browser",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the Python package playwright is not installed")


def _ask(engine: ChatEngine, prompt: str) -> str:
    return engine.chat([{"role": "user", "content": [{"type": "image", "image": IMAGE},
                                                     {"type": "text", "text": prompt}]}],
                       GenerationSettings(max_new_tokens=30))


@pytest.fixture(scope="module")
def taught_engine():
    """The tiny random model with its output layer edited to give `LESSONS` (see the module docstring).

    One teacher-forced forward pass gives the final hidden state h_i before each answer token y_i; with G = (H H^T)^-1 H
    (so that h_j . g_i = [i == j]), adding a_i g_i to row y_i of the LM head raises the logit of y_i at position i
    alone, by a_i: enough to beat every other token by MARGIN logits. Nothing else changes; generation then runs
    through the engine like any model's (greedy, KV cache), so the answers are checked, not assumed."""
    from tinygpt.chat.torch_backend import TorchBackend
    from tinygpt.data.image import ImageTransform
    from tinygpt.model import TinyGPTVForConditionalGeneration, build_config
    from tinygpt.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = TinyGPTVForConditionalGeneration(build_config("tiny")).eval()
    model.tokenizer = load_tokenizer(None)
    turns = [[{"user": f"<Img><ImageHere></Img> {q}", "assistant": a}] for q, a in LESSONS]
    head, seen = model.language_model.lm_head, []
    with torch.no_grad():
        image = ImageTransform(model.config.vision_config.image_size)(Image.open(IMAGE).convert("RGB"))[None]
        features = model.qformer_features(image).expand(len(turns), -1, -1)
        hook = head.register_forward_hook(lambda module, args, out: seen.append(args[0]))
        model(turns=turns, image_counts=[1] * len(turns), image_features=features)
        hook.remove()
        labels = model.prepare_inputs(turns, [1] * len(turns)).labels[:, 1:]  # the token each position predicts
        hidden, targets = seen[0][:, :-1][labels != -100], labels[labels != -100]
        logits = head(hidden).double()
        rival = logits.scatter(1, targets[:, None], float("-inf")).max(1).values
        boost = (rival - logits[torch.arange(len(targets)), targets]).clamp(min=0) + MARGIN
        h = hidden.double()
        head.weight.index_add_(0, targets, (boost[:, None] * torch.linalg.solve(h @ h.T, h)).to(head.weight.dtype))
    engine = ChatEngine(TorchBackend(model))
    assert [_ask(engine, q) for q, _ in LESSONS] == [a for _, a in LESSONS]
    return engine


@pytest.fixture(scope="module")
def page(taught_engine, tmp_path_factory):
    from tinygpt.demo.app import build_demo, launch

    cfg = demo_config(max_new_tokens=40)
    demo = build_demo(taught_engine, cfg, Handlers(taught_engine, cfg, tmp_path_factory.mktemp("drawn")))
    port = free_port()
    launch(demo, cfg, port=port, prevent_thread_lock=True, quiet=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#message textarea")
        yield page
        browser.close()
    demo.close()


def _send(page) -> None:
    """Submit the textbox and wait until the answer is done (the textbox is unlocked again)."""
    bots = page.locator("#chat .bot").count()
    page.locator("#message textarea").press("Enter")
    page.wait_for_function(f"document.querySelectorAll('#chat .bot').length > {bots}")
    page.wait_for_function("!document.querySelector('#message textarea').disabled")


ANSWER_TEXT, USER_TEXT = "#chat .bot:not(.component)", "#chat .user:not(.component)"  # each part is a .message


def _last_answer(page) -> str:
    return page.locator(ANSWER_TEXT).last.inner_text().strip()


def _view_pixels(page) -> np.ndarray:
    src = page.locator("#view img").get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))


@pytest.mark.slow  # ~1 min on 2 loaded cores, mostly teaching the model
def test_upload_ask_stream_boxes_region_and_a_bad_file(page, tmp_path):
    # upload an image, pick a task, ask
    page.locator("#message input[type=file]").set_input_files(IMAGE)
    page.wait_for_selector("#message img")  # uploaded: its thumbnail is in the box
    page.wait_for_selector("#view img")  # the view follows the attached image
    page.get_by_test_id("vqa-radio-label").click()
    page.locator("#message textarea").fill("how many shapes are there?")
    _send(page)
    assert page.locator(USER_TEXT).last.inner_text().strip().endswith("[vqa] how many shapes are there?")
    assert _last_answer(page) == "3"

    # Clear, then the refer example (the model knows its lessons as one-turn conversations): its answer streams in
    # (the bubble shows starts of the final answer before the whole) and its box is drawn in the chat and on the view
    page.locator("#clear").click()
    page.wait_for_function("document.querySelectorAll('#chat .message').length == 0")
    page.evaluate("""() => { window.seen = [];
        new MutationObserver(() => { const b = [...document.querySelectorAll('#chat .bot:not(.component)')].pop();
            if (b) window.seen.push(b.innerText.trim()); })
        .observe(document.querySelector('#chat'), {childList: true, subtree: true, characterData: true}); }""")
    page.get_by_text(PHRASE, exact=True).first.click()  # the examples' row
    page.wait_for_function(f"document.querySelector('#message textarea').value == '{PHRASE}'"
                           " && document.querySelector('#message img') !== null"
                           " && document.querySelector('[data-testid=refer-radio-label] input').checked")
    _send(page)
    answer = refer_answer(SCENE)
    assert _last_answer(page).startswith(answer)
    seen = [s for s in page.evaluate("window.seen") if s]
    partial = {s for s in seen if answer.startswith(s) and s != answer}
    assert partial, f"no partial answer was shown before the whole one: {seen}"
    assert page.locator("#chat .bot.component img").count() == 1  # the drawn boxes, in the chat
    view = _view_pixels(page)
    x1, y1 = (round(v / 100 * 224) * 2 for v in (39, 38))  # the box's top-left corner, in view pixels (2x)
    assert view.shape == (448, 448, 3)
    assert tuple(view[y1 + 30, x1]) == PALETTE[0] and tuple(view[y1 + 30, x1 + 30]) != PALETTE[0]
    page.locator(USER_TEXT).last.evaluate("e => e.scrollIntoView({block: 'start'})")  # the question on top
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(tmp_path / "demo.png"))
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    if os.environ.get("TINYGPT_DEMO_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "demo.png", SCREENSHOT)

    # [identify]: two clicks on the view mark the region that the question carries
    page.get_by_test_id("identify-radio-label").click()
    view_img = page.locator("#view img")
    scale = view_img.bounding_box()["width"] / 448  # display pixels per view pixel
    before = view_img.get_attribute("src")
    view_img.click(position={"x": 176 * scale + 1, "y": 174 * scale + 1})
    page.wait_for_function("document.querySelector('#region textarea').value.split(',').length == 2")
    # the first corner is drawn on a new view image: click the second only once that one has loaded (on a busy
    # machine a click on the outgoing image was lost)
    page.wait_for_function("([old]) => { const img = document.querySelector('#view img');"
                           " return img && img.getAttribute('src') !== old && img.complete && img.naturalWidth > 0; }",
                           arg=[before])
    view_img.click(position={"x": 294 * scale + 1, "y": 292 * scale + 1})
    page.wait_for_function("document.querySelector('#region textarea').value.split(',').length == 4")
    assert page.locator("#region textarea").input_value() == "88, 87, 147, 146"
    _send(page)
    assert page.locator(USER_TEXT).last.inner_text().strip() == "[identify] {<39><38><65><65>}"

    # a text file named .png: a notice in the chat, no crash, and the demo still answers afterwards
    bad = tmp_path / "notes.png"
    bad.write_text("this is text, not a picture\n")
    page.get_by_test_id("none-radio-label").click()
    page.locator("#message input[type=file]").set_input_files(str(bad))
    page.wait_for_selector("#message img")
    page.locator("#message textarea").fill("and this?")
    page.locator("#message textarea").press("Enter")
    page.wait_for_selector("#chat :text('notes.png: not a readable image')")
    assert "Not sent" in page.locator("#chat").inner_text()
    assert not page.locator("#message textarea").is_disabled()
    assert os.path.getsize(SCREENSHOT) > 20_000
