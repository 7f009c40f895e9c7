"""How much an int8 draft departs from its float self, and from the target, on held-out text.

    python3 benchmarks/draft_int8_agreement.py --target smollm2-135m-instruct --draft runs/draft/model \
        [--texts 24] [--tokens 256] [--int8-head] [--out DIR]

Speculative decoding keeps the target's output whatever the draft computes; what int8 weights
can cost is acceptance, which follows how often the draft's top token is the target's. This
scores, at every position of ``--texts`` held-out Wikipedia summaries (``--tokens`` each): the
int8 draft's top token against the float draft's, KL(float || int8), and each draft's top
token against the target's (greedy acceptance's per-position rate). CPU or GPU, float32.
``--int8-head``: the LM head in int8 as well (tried in session 16 and not kept: the engine's
int8 drafts keep their head as it is).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="the target (anything mambaify generate loads)")
    p.add_argument("--draft", required=True, help="the draft (same tokenizer)")
    p.add_argument("--texts", type=int, default=24, help="held-out Wikipedia summaries (default 24)")
    p.add_argument("--tokens", type=int, default=256, help="tokens of each text scored (default 256)")
    p.add_argument("--int8-head", action="store_true", help="quantize the draft's LM head too")
    p.add_argument("--out", type=Path, help="also write agreement.json here")
    args = p.parse_args(argv)

    from mambaify.distill import data as D
    from mambaify.generate.loading import load_for_generation
    from mambaify.generate.quantize import Int8Linear, quantize_int8

    device = "cuda" if torch.cuda.is_available() else "cpu"
    target, tokenizer = load_for_generation(args.target, device=device, dtype="float32")
    draft, _ = load_for_generation(args.draft, device=device, dtype="float32")
    quantized = quantize_int8(copy.deepcopy(draft))
    if args.int8_head:
        quantized.lm_head = Int8Linear.from_linear(quantized.lm_head)
    texts = D.wiki_heldout_texts(args.texts)
    same = with_target_float = with_target_int8 = positions = 0
    kl = 0.0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens].to(device)
            wanted = target(ids).logits.argmax(-1)
            floats = draft(ids).logits.float().log_softmax(-1)
            ints = quantized(ids).logits.float().log_softmax(-1)
            same += int((floats.argmax(-1) == ints.argmax(-1)).sum())
            with_target_float += int((floats.argmax(-1) == wanted).sum())
            with_target_int8 += int((ints.argmax(-1) == wanted).sum())
            kl += float((floats.exp() * (floats - ints)).sum())
            positions += ids.shape[1]
    result = dict(target=args.target, draft=args.draft, int8_head=args.int8_head, texts=len(texts), positions=positions, device=device,
                  date=time.strftime("%Y-%m-%d"), int8_same_top1=same / positions, kl_float_int8=kl / positions,
                  top1_with_target_float=with_target_float / positions,
                  top1_with_target_int8=with_target_int8 / positions)
    print(f"{positions} positions: the int8 draft's top token is the float draft's at {result['int8_same_top1']:.2%} "
          f"(KL {result['kl_float_int8']:.5f} nats); the target's at {result['top1_with_target_int8']:.2%} "
          f"against {result['top1_with_target_float']:.2%} for the float draft")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "agreement.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
