"""Sweep tiny-LLM pretraining variants, many processes sharing one GPU (an experiment; not part of the package).

    TINYGPT_CACHE=<dir with the built tokenizer> PYTHONPATH=. python experiments/llm_depth_sweep/probe.py \
        OUT_DIR WORKERS experiments/llm_depth_sweep/sweep3.json      # PROBE_DEVICE=cpu to run on the CPU

Each variant: {"name", "seed", "settings": {LLMPretrainSettings fields}, "text": {text_config fields},
"globals": {"pretrain_llm.X" / "scene_code.X": value}, "betas": [b1, b2]}. The model is the ``tiny`` preset's
(4 layers) with the settings' width; ``text.num_hidden_layers`` sets the depth (``LLMPretrainSettings.num_layers``,
added after these sweeps, is not read here, so the sweep files mean what they meant when they ran).
Writes one JSON line per variant to OUT_DIR/results.jsonl: teacher-forced exact-match VQA per kind on 700 held-out
scenes (stage-4 wording, true scene code; a question counts when every answer token is the top prediction), and the
generated ceiling (VQA / grounding, 42 scenes). sweep1 ran out of time after the variants in its results file.
"""
import json
import multiprocessing as mp
import os
import random
import sys
import time
import traceback

DEVICE = os.environ.get("PROBE_DEVICE", "cuda")


def evaluate_vqa(language_model, tokenizer, scenes=700, seed=0, batch=350):
    import torch
    from tinygpt.tiny.synthetic import texts
    from tinygpt.tiny.synthetic.scenes import sample_scene, scene_rng
    from tinygpt.tiny.shapes import VQA_INSTRUCTION
    from tinygpt.model.sequence import IGNORE
    from tinygpt.tasks import wrap_instruction
    from tinygpt.tiny import pretrain_llm as P
    from tinygpt.tiny.scene_code import slot_embeddings, vocabulary_token_ids

    cfg = language_model.config
    vocab = vocabulary_token_ids(tokenizer)
    docs, kinds = [], []
    for i in range(scenes):
        scene = sample_scene(scene_rng(seed, "probe-eval", i), 224)
        rng = scene_rng(seed, "text:probe-eval", i)
        qa = texts.question(scene, texts.VQA_KINDS[i % len(texts.VQA_KINDS)], rng)
        docs.append(([{"user": wrap_instruction(VQA_INSTRUCTION.format(qa.question)), "assistant": qa.answer}],
                     [scene], "instruct"))
        kinds.append(qa.kind)
    rows = P.encode_documents(docs, tokenizer, vocab, cfg.bos_token_id, cfg.pad_token_id, 224)
    identity = torch.arange(cfg.vocab_size)
    body, head, embed = language_model.model, language_model.lm_head, language_model.model.embed_tokens
    language_model.eval()
    hits = []
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            index = list(range(start, min(start + batch, len(rows))))
            slots, labels, mask = P._batch(rows, index, identity)
            slots, labels, mask = (t.to(DEVICE) for t in (slots, labels, mask))
            hidden = body(inputs_embeds=slot_embeddings(slots, embed), attention_mask=mask,
                          use_cache=False).last_hidden_state
            pred = head(hidden[:, :-1]).argmax(-1)
            target = labels[:, 1:]
            keep = target != IGNORE
            ok = ((pred == target) | ~keep).all(-1)
            hits += ok.tolist()
    per_kind = {}
    for k, h in zip(kinds, hits):
        per_kind.setdefault(k, []).append(h)
    return sum(hits) / len(hits), {k: round(100 * sum(v) / len(v), 1) for k, v in per_kind.items()}


def run_variant(variant):
    import dataclasses
    import torch
    torch.set_default_device(DEVICE)
    from tinygpt.tiny import pretrain_llm as P
    from tinygpt.tiny import scene_code as S
    modules = {"pretrain_llm": P, "scene_code": S}
    for key, value in variant.get("globals", {}).items():
        mod, name = key.split(".")
        setattr(modules[mod], name, tuple(map(tuple, value)) if name == "DOCUMENT_MIX" else value)
    if "betas" in variant:
        original = torch.optim.AdamW
        torch.optim.AdamW = lambda groups, **kw: original(groups, betas=tuple(variant["betas"]), **kw)
    from tinygpt.model import TinyGPTVForConditionalGeneration, build_config
    from tinygpt.tokenizer import load_tokenizer

    fields = {"steps": 1300, **variant.get("settings", {})}  # the default when these sweeps ran
    if "document_mix" in fields:
        fields["document_mix"] = tuple(map(tuple, fields["document_mix"]))
    settings = dataclasses.replace(P.LLMPretrainSettings(), seed=variant.get("seed", 0), **fields)
    if "documents" not in fields:
        settings = settings.with_steps(settings.steps)
    torch.manual_seed(settings.seed)
    tokenizer = load_tokenizer()
    config = build_config("tiny", tokenizer_source="builtin")
    config.text_config.hidden_size, config.text_config.intermediate_size = settings.hidden_size, settings.intermediate_size
    for key, value in variant.get("text", {}).items():
        setattr(config.text_config, key, value)
    model = TinyGPTVForConditionalGeneration(config)
    lm = model.language_model
    start = time.time()
    figures = P.pretrain_llm(lm, tokenizer, settings, progress=False)
    train_s = time.time() - start
    vqa, per_kind = evaluate_vqa(lm, tokenizer)
    ceiling = figures.get("true_code_ceiling", {})
    return {"name": variant["name"], "seed": settings.seed, "vqa_tf": round(100 * vqa, 1), "per_kind": per_kind,
            "ceiling_vqa": round(100 * ceiling.get("vqa_accuracy", float("nan")), 1),
            "ceiling_grounding": round(100 * ceiling.get("grounding_accuracy", float("nan")), 1),
            "loss": round(figures["loss"], 4), "heldout_token_acc": round(figures["heldout_answer_token_accuracy"], 4),
            "train_s": round(train_s, 1), "prep_s": round(figures["prep_s"], 1)}


def worker(variant):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        return run_variant(variant)
    except Exception:
        return {"name": variant["name"], "seed": variant.get("seed", 0), "error": traceback.format_exc()[-2000:]}


def main():
    out, workers, spec = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    variants = json.load(open(spec))
    os.makedirs(out, exist_ok=True)
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool, open(os.path.join(out, "results.jsonl"), "a") as handle:
        for result in pool.imap_unordered(worker, variants):
            line = json.dumps(result)
            print(line, flush=True)
            handle.write(line + "\n")
            handle.flush()


if __name__ == "__main__":
    main()
