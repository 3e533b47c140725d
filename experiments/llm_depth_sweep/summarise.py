"""Mean and per-seed figures of the sweep results: python experiments/llm_depth_sweep/summarise.py *_results.jsonl"""
import json
import sys
from collections import defaultdict

rows = defaultdict(list)
for path in sys.argv[1:]:
    for line in open(path):
        result = json.loads(line)
        if "error" not in result:
            rows[result["name"]].append(result)


def per_seed(runs, value):
    return " / ".join(value(r) for r in runs)


print("| variant | VQA, mean (per seed) | colour | count of a shape | ceiling VQA–grounding |")
print("|---|---|---|---|---|")
for name, runs in rows.items():
    runs.sort(key=lambda r: r["seed"])
    mean = sum(r["vqa_tf"] for r in runs) / len(runs)
    vqa = per_seed(runs, lambda r: f"{r['vqa_tf']:.1f}")
    colour = per_seed(runs, lambda r: f"{r['per_kind']['color']:.0f}")
    count_shape = per_seed(runs, lambda r: f"{r['per_kind']['count_shape']:.0f}")
    ceiling = per_seed(runs, lambda r: f"{r['ceiling_vqa']:.0f}–{r['ceiling_grounding']:.0f}")
    print(f"| {name} | {mean:.1f} ({vqa}) | {colour} | {count_shape} | {ceiling} |")
