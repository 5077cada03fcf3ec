"""The CPU peer for docs/benchmarks.md: a plain transformers script, `generate` in left-padded batches of 16.

Reads the same JSONL as `kvbatch generate` (a "prompt" column), sends each prompt through the model's chat
template, decodes greedily and writes one JSON line per row. Time it from process start:

    time python scripts/hf_generate_baseline.py examples/data/chat_128.jsonl /tmp/hf_out.jsonl
    time kvbatch generate examples/data/chat_128.jsonl -o /tmp/kv_out.arrow --max-new-tokens 64
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvbatch.runner.default_model import default_model_path  # the same converted folder kvbatch loads


def main(input_path: str, output_path: str, batch_size: int = 16, max_new_tokens: int = 64) -> None:
    folder = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with open(input_path) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    with open(output_path, "w") as out:
        for i in range(0, len(prompts), batch_size):
            chats = [[{"role": "user", "content": p}] for p in prompts[i : i + batch_size]]
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
            for row in generated[:, batch["input_ids"].shape[1] :]:
                out.write(json.dumps({"text": tokenizer.decode(row, skip_special_tokens=True)}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
