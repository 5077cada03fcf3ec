"""The fast CPU peer for docs/benchmarks.md: CTranslate2's `generate_batch` on the same weights, float32.

Converts the folder kvbatch loads for `model: default` once (into --ct2-dir), reads the same JSONL as
`kvbatch generate` (a "prompt" column), renders each prompt with the model's chat template, decodes greedily with
CTranslate2's own batching and writes one JSON line per row. Time it from process start, the conversion already
done (run once without timing first):

    pip install ctranslate2
    python scripts/ct2_generate_baseline.py examples/data/chat_128.jsonl /tmp/ct2_out.jsonl   # converts once
    time python scripts/ct2_generate_baseline.py examples/data/chat_128.jsonl /tmp/ct2_out.jsonl
    time kvbatch generate examples/data/chat_128.jsonl -o /tmp/kv_out.arrow --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from transformers import AutoTokenizer

from kvbatch.runner.default_model import default_model_path  # the same converted folder kvbatch loads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--ct2-dir", default="/tmp/ct2-smollm2-135m-float32")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=128)
    args = parser.parse_args()
    try:
        import ctranslate2
    except ImportError:  # not a dependency of kvbatch: the peer is installed by hand, as the docstring says
        print(f"{parser.prog}: error: ctranslate2 is not installed (pip install ctranslate2)", file=sys.stderr)
        raise SystemExit(2) from None
    folder = default_model_path()
    if not Path(args.ct2_dir, "model.bin").exists():
        ctranslate2.converters.TransformersConverter(str(folder)).convert(args.ct2_dir, quantization="float32")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    generator = ctranslate2.Generator(args.ct2_dir, device="cpu", compute_type="float32", intra_threads=os.cpu_count())
    with open(args.input) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    chats = [[{"role": "user", "content": p}] for p in prompts]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    tokens = [tokenizer.convert_ids_to_tokens(i) for i in ids]
    results = generator.generate_batch(
        tokens,
        max_length=args.max_new_tokens,
        sampling_topk=1,
        include_prompt_in_result=False,
        max_batch_size=args.max_batch_size,
        end_token=tokenizer.eos_token,
    )
    with open(args.output, "w") as out:
        for result in results:
            text = tokenizer.decode(result.sequences_ids[0], skip_special_tokens=True)
            out.write(json.dumps({"text": text}) + "\n")


if __name__ == "__main__":
    main()
