"""CPU runtime, chat: the sampler and stop strings, the chat session (layout, KV reuse, streaming, backends),
the vision runtime and the session of an exported tiny VLM against the PyTorch model, and the chat CLI.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
ggml_llm = pytest.importorskip("quantize.ggml_llm")

from gguf_reference import image_vectors, rel_err, tiny_vocab  # noqa: E402
from tinygpt.errors import UserError  # noqa: E402

from quantize import gguf_names as names  # noqa: E402
from quantize.gguf_file import chat_format, open_gguf  # noqa: E402
from quantize.gguf_tokenizer import load_tokenizer  # noqa: E402


# ------------------------------------------------------------------------------------------------ sampler
from quantize.sampler import Sampler, SamplingParams, StopMatcher  # noqa: E402


def test_sampler_greedy_penalty_top_p_and_seed():
    logits = np.array([1.0, 3.0, 2.9, -1.0, 0.5])
    assert Sampler(SamplingParams(temperature=0.0, repetition_penalty=1.0))(logits) == 1
    # penalty 1.1 divides the positive logit 3.0 of the seen token 1 -> 2.73 < 2.9
    assert Sampler(SamplingParams(temperature=0.0, repetition_penalty=1.1))(logits, previous=[1]) == 2
    # top_p 0.5: tokens 1 and 2 hold 0.48 + 0.44 of the mass at T=1 -> only they can be drawn
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.5, repetition_penalty=1.0, seed=0))
    draws = {s(logits) for _ in range(200)}
    assert draws == {1, 2}

    def draw(seed):
        sampler = Sampler(SamplingParams(temperature=1.0, top_p=1.0, seed=seed))
        return [sampler(logits) for _ in range(20)]

    assert draw(7) == draw(7) and len(set(draw(7))) > 1 and draw(7) != draw(8)


@pytest.mark.parametrize("field,value,flag", [("temperature", -1.0, "--temperature"), ("top_p", 0.0, "--top-p"),
                                              ("repetition_penalty", 0.0, "--repetition-penalty"),
                                              ("max_new_tokens", 0, "--max-new-tokens")])
def test_sampler_rejects_bad_params(field, value, flag):
    with pytest.raises(UserError, match=flag):
        Sampler(SamplingParams(**{field: value}))


def test_stop_matcher_holds_back_partial_stop_strings():
    m = StopMatcher(["###", "Human:"])
    assert m.find("a cat ### b") == 6 and m.find("a cat") == -1
    assert m.safe_prefix_length("a cat #") == 6
    assert m.safe_prefix_length("a cat ##") == 6
    assert m.safe_prefix_length("a Hum") == 2
    assert m.safe_prefix_length("a cat") == 5


# ------------------------------------------------------------------------------------------------ session
from quantize.engine_choice import load_language_model  # noqa: E402
from quantize.session import ChatSession  # noqa: E402


def _session(path, sampling=None, **kw) -> ChatSession:
    f = open_gguf(path, names.ARCH_LLM)
    llm = ggml_llm.GgmlLLM(f, kv_type="f32", **kw)
    return ChatSession(llm=llm, tokenizer=load_tokenizer(f), fmt=chat_format(f),
                       sampling=sampling or SamplingParams(temperature=0.0, repetition_penalty=1.0, max_new_tokens=6))


class _RecordingSampler:
    """Wraps the session's sampler and keeps the logits it was given."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __call__(self, logits, previous=()):
        self.seen.append(np.array(logits))
        return self.inner(logits, previous)


def test_session_layout_follows_training_format(llm_files):
    s = _session(llm_files["f32"])
    eos = tiny_vocab()[3]
    s.image_vectors.append(image_vectors(0))
    from quantize.session import Turn
    items = s.layout([Turn("<Img><ImageHere></Img> hi", [0], "ok"), Turn("more", [])])
    text_ids = [i for i in items if isinstance(i, int)]
    assert items[0] == eos and [i for i in items if isinstance(i, tuple)] == [(0, j) for j in range(4)]
    decoded = s.tokenizer.decode(text_ids, skip_special_tokens=False)
    assert decoded == ("<|endoftext|>###Human: <Img></Img> hi ###Assistant: ok###"
                       "<|endoftext|>###Human: more ###Assistant: ")


def test_session_greedy_with_cache_equals_recomputation_and_multi_turn_reuse(llm_files):
    """Greedy decoding through the KV cache == greedy recomputed from scratch at every step; the second turn
    evaluates only its new positions, and its logits equal one long prefill of the whole conversation."""
    # F32 weights: with 8-bit activations (Q8_0) a one-ulp difference between the batched and the one-row kernels
    # can flip one rounding and move a logit by ~0.02 (seen on an AVX2-only EPYC), which says nothing of the cache
    path = llm_files["f32"]
    s = _session(path)
    rec = _RecordingSampler(s.sampler)
    s.sampler = rec
    image = image_vectors(1)
    answer1 = s.ask("what is it?", images=[image])
    first_turn_positions = len(s.layout(s.turns))
    # recompute turn 1 greedily from scratch (no cache reuse at all)
    prompt = s.layout(s.turns[:0] + [type(s.turns[0])(s.turns[0].user, [0])])
    fresh = _session(path)
    fresh.image_vectors.append(image)
    tokens = []
    for step in range(len(rec.seen)):
        m = fresh.llm
        m.reset()
        fresh._cached = []
        logits = fresh._feed(prompt + tokens)
        assert np.abs(logits - rec.seen[step]).max() < 1e-3
        tokens.append(int(np.argmax(logits)))
    assert s.tokenizer.decode(tokens, skip_special_tokens=False).startswith(answer1) or answer1 == ""
    # turn 2 reuses the cache
    rec.seen.clear()
    s.ask("and then?")
    # random weights emit arbitrary bytes, whose text may re-tokenize differently: the first prompt is always kept
    assert len(prompt) <= s.last_stats.reused_tokens <= first_turn_positions
    assert s.last_stats.reused_tokens + s.last_stats.prompt_tokens == len(s.layout(s.turns[:1])) + len(
        s.layout([type(s.turns[1])("and then?", [])]))
    one_shot = _session(path)
    one_shot.image_vectors.append(image)
    turns = [type(t)(t.user, t.images, t.answer) for t in s.turns]
    turns[-1].answer = None
    want = one_shot._feed(one_shot.layout(turns))
    assert np.abs(rec.seen[0] - want).max() < 1e-3


def test_session_rejects_over_long_prompt_and_keeps_state(llm_files):
    s = _session(llm_files["f32"])
    s.ask("hi")
    n_turns, n_past = len(s.turns), s.llm.n_past
    with pytest.raises(UserError, match=r"prompt too long: the conversation needs \d+ positions, the context holds "
                                         r"96, which must leave at least one position for the answer"):
        s.ask("x" * 200)
    assert len(s.turns) == n_turns and s.llm.n_past == n_past
    with pytest.raises(UserError, match="2 <ImageHere> but 1 image"):
        s.ask("<ImageHere> <ImageHere>", images=[image_vectors(2)])
    assert len(s.image_vectors) == 0


def test_session_prepare_then_ask_equals_ask_and_evaluates_only_the_question(llm_files):
    """prepare() encodes the image and evaluates the next turn up to its last row; the ask that follows evaluates only
    the question's tokens, and its logits and greedy answer equal a cold ask of the same image and question."""
    path = llm_files["q8_0"]
    cold = _session(path, n_ctx=200)
    rec_cold = _RecordingSampler(cold.sampler)
    cold.sampler = rec_cold
    want = cold.ask("what is it?", images=[image_vectors(1)])
    warm = _session(path, n_ctx=200)
    rec = _RecordingSampler(warm.sampler)
    warm.sampler = rec
    assert warm.prepare([image_vectors(1)]) == [0]
    prefix = warm.llm.n_past
    assert prefix == 1 + len(warm._tokens("###Human: <Img>")) + 4  # BOS, template text, the image's 4 rows
    assert warm.ask("what is it?", images=[0]) == want
    first_prompt = len(warm.layout([type(warm.turns[0])(warm.turns[0].user, [0])]))
    assert warm.last_stats.reused_tokens == prefix and warm.last_stats.prompt_tokens == first_prompt - prefix
    assert np.abs(rec.seen[0] - rec_cold.seen[0]).max() < 1e-4
    # a second prepared turn with two images keeps the first image's index; the follow-up reuses the whole first turn
    assert warm.prepare([image_vectors(2)]) == [1] and warm.prepare([1, image_vectors(3)]) == [1, 2]
    assert warm.last_stats.reused_tokens >= first_prompt  # (the answer's text may re-tokenize differently)
    warm.ask("and these?", images=[1, 2])
    assert len(warm.turns) == 2 and warm.turns[1].images == [1, 2]
    with pytest.raises(UserError, match="image index 7 does not name an encoded image"):
        warm.prepare([7])
    with pytest.raises(UserError, match="image index 5 does not name"):
        warm.ask("x", images=[image_vectors(4), 5])
    assert len(warm.image_vectors) == 3  # the image added before the bad index was dropped again


def test_session_prepare_refuses_a_prefix_longer_than_the_context(llm_files):
    s = _session(llm_files["f32"], n_ctx=8)
    with pytest.raises(UserError, match="prompt too long: the conversation and the image.s. need 1[0-9] positions, "
                                         "the context holds 8, which must leave at least one position"):
        s.prepare([image_vectors(0)])
    assert s.llm.n_past == 0


class _ScriptedLLM:
    """Stands in for the decoder: each evaluation returns one-hot logits for the next scripted token."""

    def __init__(self, script, hidden, vocab, n_ctx=200):
        from types import SimpleNamespace
        self.script, self.n_past, self.n_ctx = list(script), 0, n_ctx
        self.hp = SimpleNamespace(hidden_size=hidden, vocab_size=vocab)

    def _next(self, n):
        self.n_past += n
        out = np.zeros(self.hp.vocab_size, np.float32)
        out[self.script.pop(0)] = 10.0
        return out

    def eval_tokens(self, ids):
        return self._next(len(ids))

    def eval_embeddings(self, rows):
        return self._next(len(rows))

    def truncate(self, n):
        self.n_past = n


def test_session_streams_text_and_stops_at_stop_string(llm_files):
    f = open_gguf(llm_files["f32"], names.ARCH_LLM)
    tok = load_tokenizer(f)
    script = (tok.encode("Hi there Human ok", add_special_tokens=False).ids
              + tok.encode("###", add_special_tokens=False).ids)
    script += tok.encode(" never shown", add_special_tokens=False).ids
    s = ChatSession(llm=_ScriptedLLM([0] + script, 256, len(tiny_vocab()[0])), tokenizer=tok, fmt=chat_format(f),
                    sampling=SamplingParams(temperature=0.0, repetition_penalty=1.0, max_new_tokens=50))
    s.llm.script = script  # the prompt prefill returns the first scripted token
    chunks = []
    answer = s.ask("hello", on_text=chunks.append)
    assert answer == "Hi there Human ok"
    assert "".join(chunks) == "Hi there Human ok" and all("#" not in c for c in chunks)
    assert s.last_stats.stopped_by == "stop string"
    eos = tiny_vocab()[3]
    scripted = _ScriptedLLM(tok.encode("Yes", add_special_tokens=False).ids + [eos, 5], 256, len(tiny_vocab()[0]))
    s2 = ChatSession(llm=scripted, tokenizer=tok, fmt=chat_format(f),
                     sampling=SamplingParams(temperature=0.0, repetition_penalty=1.0))
    assert s2.ask("q") == "Yes" and s2.last_stats.stopped_by == "eos"


def test_ctrl_c_during_an_answer_leaves_that_question_out_of_the_conversation(llm_files):
    """The interactive chat goes on after Ctrl-C: the interrupted question used to stay in the history without an
    answer, so every later prompt held it with no answer and no end symbol, a layout training never makes."""
    s = _session(llm_files["f32"])
    s.ask("first")

    def interrupt(text):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        s.ask("second", on_text=interrupt)
    assert [t.user for t in s.turns] == ["first"] and s.turns[0].answer is not None
    s.ask("third")
    assert [t.user for t in s.turns] == ["first", "third"]


def test_a_template_without_its_placeholder_gets_the_user_text_appended(llm_files):
    """Training appends the user text to a prompt_template without '{}' (PromptFormat.wrap); the export wrote such a
    template as it was, and every runtime then refused the file. The export appends '{}', and a file written before
    is read the same way; two '{}' stay refused."""
    from types import SimpleNamespace

    from quantize.gguf_meta import PromptInfo

    config = SimpleNamespace(prompt_template="Question: ", end_sym="\n", stop_strings=None, num_query_tokens=32,
                             image_placeholder="<ImageHere>")
    assert PromptInfo.from_config(config).prompt_template == "Question: {}"
    f = open_gguf(llm_files["f32"], names.ARCH_LLM)
    for written, read in (("Question: ", "Question: {}"), ("Q: {} A:", "Q: {} A:")):
        f.metadata[names.PROMPT_TEMPLATE] = written
        assert chat_format(f).prompt_template == read
    f.metadata[names.PROMPT_TEMPLATE] = "{} and {}"
    with pytest.raises(UserError, match="must contain at most one"):
        chat_format(f)


def test_seed_minus_one_is_a_fresh_seed_and_a_tiny_temperature_is_greedy():
    """--seed -1 (llama.cpp's 'random') crashed in NumPy after the model had loaded; other negative or huge seeds are
    refused before it loads. A temperature of 1e-310 overflowed the logits to NaN; under 1e-5 it is greedy."""
    assert SamplingParams(seed=-1).validate().seed is None
    for seed in (-2, 2**64):
        with pytest.raises(UserError, match=r"--seed must be an integer in 0 \.\. 2\*\*64-1"):
            SamplingParams(seed=seed).validate()
    logits = np.array([1.0, 3.0, 2.9])
    assert Sampler(SamplingParams(temperature=1e-310, repetition_penalty=1.0))(logits) == 1


def test_backend_auto_falls_back_to_torch_with_notice(llm_files, monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__

    def no_ggml(name, *args, **kwargs):
        if name == "ggml" or name.endswith("ggml_llm") or (args and args[2] and "ggml_llm" in args[2]):
            raise ImportError("ggml-python is not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ggml)
    llm = load_language_model(open_gguf(llm_files["f32"], names.ARCH_LLM), backend="auto")
    assert type(llm).__name__ == "TorchLLM"
    assert capsys.readouterr().err.count("notice: ggml-python unavailable") == 1
    with pytest.raises(UserError, match="--backend ggml: ggml-python cannot be imported"):
        load_language_model(open_gguf(llm_files["f32"], names.ARCH_LLM), backend="ggml")


# ------------------------------------------------------------------------------------------------ exported tiny VLM
@pytest.fixture(scope="module")
def exported_tiny(tmp_path_factory):
    """The tiny TinyGPT-V preset (seeded random init, norms perturbed), saved and exported as F16 with
    quantize.export."""
    import torch
    from tinygpt.model import TinyGPTVForConditionalGeneration, build_config
    from tinygpt.model.checkpoint_io import save_vlm
    from tinygpt.tokenizer import load_tokenizer as load_hf_tokenizer
    export = pytest.importorskip("quantize.export")

    torch.manual_seed(0)
    model = TinyGPTVForConditionalGeneration(build_config("tiny")).eval()
    model.tokenizer = load_hf_tokenizer(None)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
        model.language_model.lm_head.weight.mul_(50.0)  # logits of O(1) instead of O(0.01)
    d = tmp_path_factory.mktemp("tiny_vlm")
    save_vlm(model, d / "model")
    export.export_model(d / "model", d / "gguf", qtype="f16", progress=False)
    from PIL import Image
    Image.fromarray((np.random.default_rng(0).random((90, 130, 3)) * 255).astype(np.uint8)).save(d / "img.png")
    (d / "notes.txt").write_text("not an image")
    return model, d


def test_vision_runtime_matches_pytorch_vision_path(exported_tiny):
    """The vision GGUF (Linear weights Q8_0) run through VisionEncoder reproduces model.encode_images: fp32 mode
    within Q8_0 weight rounding (measured ~0.3 % of the largest output), int8 mode within ~2 % (limit 6 %)."""
    import torch
    from quantize.vision_runtime import VisionEncoder
    model, d = exported_tiny
    vfile = open_gguf(d / "gguf" / names.VISION_FILE_NAME, names.ARCH_VISION)
    fp32 = VisionEncoder(vfile, int8=False)
    pixels = fp32.preprocess(d / "img.png")
    assert tuple(pixels.shape) == (1, 3, 112, 112)
    with torch.no_grad():
        want = model.encode_images(pixels)[0].numpy()
    got = fp32.encode_pixels(pixels)
    assert got.shape == (32, 256)
    assert rel_err(got, want) < 0.02, rel_err(got, want)
    q8 = VisionEncoder(vfile, int8=True).encode_pixels(pixels)
    assert rel_err(q8, want) < 0.06, rel_err(q8, want)


def test_session_layout_equals_training_sequence_and_logits_match_model(exported_tiny):
    """The chat session lays out a two-turn conversation exactly as tinygpt.model.sequence does for training,
    and its next-token logits (F16 file, ggml) match the PyTorch model on the same input: F16 weights and ggml's
    F16 activation rounding give ~0.1 % of the largest logit (|logit| up to ~40 here); limit 0.5 %."""
    import torch
    from tinygpt.model.sequence import IMAGE_SLOT, sample_ids
    from quantize.session import Turn, open_session
    model, d = exported_tiny
    s = open_session(d / "gguf", quiet=True)
    vectors = model.encode_images(s.vision.preprocess(d / "img.png"))[0].detach().numpy()
    idx = s.add_image(vectors)
    turns = [Turn("<Img><ImageHere></Img> What is this?", [idx], " A red square."), Turn("Where is it?", [])]
    items = s.layout(turns)
    fmt = model.prompt_format()
    conv = [{"user": t.user, "assistant": t.answer} for t in turns]
    ids, _, _ = sample_ids(conv, model.tokenizer, fmt, None, 1, where="test")
    assert [IMAGE_SLOT if isinstance(i, tuple) else i for i in items] == ids
    got = s._sync_cache(items)
    with torch.no_grad():
        emb = model.language_model.get_input_embeddings()(torch.tensor([max(i, 0) for i in ids]))
        emb[torch.tensor(ids) == IMAGE_SLOT] = torch.from_numpy(vectors)
        want = model.language_model(inputs_embeds=emb[None], use_cache=False).logits[0, -1].numpy()
    assert want.std() > 0.1
    assert rel_err(got, want) < 5e-3, rel_err(got, want)
    assert int(np.argmax(got)) == int(np.argmax(want))


def _run_cli(args, stdin_text=None, monkeypatch=None, capsys=None):
    import io
    from quantize.__main__ import main
    if stdin_text is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin_text))
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _answered_tokens(err: str) -> list[int]:
    """The generated-token counts of the stats lines (--verbose, /stats) in a chat run's stderr."""
    return [int(n) for n in re.findall(r"\| (\d+) tok at ", err)]


def test_chat_cli_one_shot_and_interactive_survives_bad_input(exported_tiny, monkeypatch, capsys):
    _, d = exported_tiny
    g = str(d / "gguf")
    rc, out, err = _run_cli(["chat", "--gguf", g, "--image", str(d / "img.png"), "--prompt", "What is it?",
                             "--max-new-tokens", "4", "--verbose"], capsys=capsys)
    # random weights may answer with ids that decode to nothing (Phi-2's unused ids): count tokens, not text
    assert rc == 0 and "first token" in err and _answered_tokens(err) in ([1], [2], [3], [4]), err
    assert err.startswith(f"[{d / 'gguf'}/llm-"), err  # --verbose names the file chosen among several
    lines = "\n".join([f"/image {d / 'missing.png'}", f"/image {d / 'notes.txt'}", "x " * 1500, "/bogus",
                       f"/image {d / 'img.png'}", "hello there", "/stats", "/quit"]) + "\n"
    rc, out, err = _run_cli(["chat", "--gguf", g, "--max-new-tokens", "3"], stdin_text=lines,
                            monkeypatch=monkeypatch, capsys=capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 0 and len(errors) == 4, err
    assert "missing.png: image file not found" in errors[0]
    assert "notes.txt: not a readable image" in errors[1]
    assert "prompt too long" in errors[2] and "unknown command '/bogus'" in errors[3]
    assert _answered_tokens(err) in ([1], [2], [3]), err  # the valid question got an answer (/stats shows its turn)
    # the attached image was prepared before the question: the question reused BOS, the template text and its 32 rows
    rc, out, err = _run_cli(["chat", "--gguf", g, "--max-new-tokens", "3", "--verbose"],
                            stdin_text=f"/image {d / 'img.png'}\nWhat is it?\n/quit\n", monkeypatch=monkeypatch,
                            capsys=capsys)
    reused = [int(m) for m in re.findall(r"\(reused (\d+)\)", err)]
    assert rc == 0 and len(reused) == 1 and reused[0] > 32, err


def test_session_warm_up_leaves_the_shared_start_cached(exported_tiny):
    from quantize.session import open_session
    _, d = exported_tiny
    s = open_session(d / "gguf", quiet=True)
    shared = [s.fmt.bos_id] + s._tokens("###Human:")
    assert s._cached == shared and s.llm.n_past == len(shared)
    s.ask("Hello?")
    assert s.last_stats.reused_tokens == len(shared)


def test_cli_user_errors_exit_2_with_one_line(tmp_path, exported_tiny, capsys):
    _, d = exported_tiny
    rc, out, err = _run_cli(["chat", "--gguf", str(tmp_path / "nope"), "--prompt", "hi"], capsys=capsys)
    assert rc == 2 and err.strip().count("\n") == 0 and "error:" in err and "not found" in err
    rc, out, err = _run_cli(["chat", "--gguf", str(d / "gguf"), "--image", str(d / "notes.txt"), "--prompt", "hi"],
                            capsys=capsys)
    assert rc == 2 and "notes.txt: not a readable image" in err
    rc, out, err = _run_cli(["chat", "--gguf", str(d / "gguf"), "--temperature", "-1", "--prompt", "hi"], capsys=capsys)
    assert rc == 2 and "--temperature" in err


def test_llama_cpp_backend_absent_is_a_user_error(llm_files, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    with pytest.raises(UserError, match="llama-cpp-python is not importable"):
        load_language_model(open_gguf(llm_files["f32"], names.ARCH_LLM), backend="llama-cpp")
