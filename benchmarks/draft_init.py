"""Where a draft made of the teacher's own layers starts, before any training: its KL from the
target and top-1 agreement with it on held-out Wikipedia summaries, for several layer choices.

Usage (CPU is enough):

    python3 benchmarks/draft_init.py --target HYBRID_DIR [--teacher smollm2-135m-instruct]
        [--layers "0,-1;0,1;0,1,2;0,1,-1;0,-2,-1"] [--texts 12] [--tokens 128]

Prints one line per choice: the layers (as ``mambaify distill-draft --layers`` takes them), the
per-token KL(target || draft) in nats and the top-1 agreement, over every next-token prediction
of the kept tokens (as the distillation's evaluation scores them).
"""

from __future__ import annotations

import argparse
import sys

import torch

from mambaify.distill import data as D
from mambaify.distill.losses import token_metrics
from mambaify.draft import build_draft_from_teacher
from mambaify.generate.loading import load_for_generation
from mambaify.teachers import load_teacher


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="the model the draft serves (a saved hybrid folder, ...)")
    p.add_argument("--teacher", default="smollm2-135m-instruct", help="where the draft's layers come from")
    p.add_argument("--layers", default="0,-1;0,1;0,1,2;0,1,-1;0,-2,-1", help="layer choices, ';'-separated")
    p.add_argument("--texts", type=int, default=12, help="held-out summaries scored")
    p.add_argument("--tokens", type=int, default=128, help="tokens kept of each summary")
    args = p.parse_args(argv)

    target, tokenizer = load_for_generation(args.target, device="cpu", dtype="float32")
    teacher, _ = load_teacher(args.teacher, dtype=torch.float32, device="cpu")
    texts = [tokenizer(t, return_tensors="pt").input_ids[:, : args.tokens] for t in D.wiki_heldout_texts(args.texts)]
    with torch.no_grad():
        target_logits = [target(input_ids=ids).logits for ids in texts]
        for choice in args.layers.split(";"):
            draft = build_draft_from_teacher(teacher, [int(i) for i in choice.split(",")]).eval()
            kl = agree = n = 0.0
            for ids, t_logits in zip(texts, target_logits):
                m = token_metrics(draft(input_ids=ids).logits, t_logits, ids, torch.ones_like(ids))
                kl, agree, n = kl + float(m["kl"].sum()), agree + float(m["agree"].float().sum()), n + m["n_tokens"]
            print(f"layers {choice}: KL {kl / n:.2f}, top-1 agreement {agree / n:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
