"""Would a draft that reads the target's hidden state accept more tokens than one that reads only
tokens? An experiment for issue 5, before any engine work.

The drafts of ``mambaify distill-draft`` see tokens only: at SmolLM2 scale a 2-layer draft agrees
with the 50% hybrid on about 61% of greedy tokens per position (BENCHMARKS.md, session 9), and
both open speed-up targets need about 71%. A draft that also reads the target's last hidden
state (the feature that the verify call computes anyway; the EAGLE family of drafts) is the
known way to more. This script trains both kinds for the same steps on the same batches and
measures how many tokens each would have accepted per round, so that the engine work is done
only if it pays:

* token draft: the teacher's first and last layers, embeddings and head (what ``distill-draft``
  builds), trained on the KL to the target's next-token distribution;
* feature draft: one layer (the teacher's last), fed ``fc([embed(x_s), f_{s-1}])`` where
  ``f_{s-1}`` is the target's final (normed) hidden state at the position before, with the
  teacher's head; trained on the same KL plus a smooth-L1 pull of its own final hidden state
  towards the target's ``f_s``. At depth j of a round its feature input is its own output of
  depth j - 1 (it has not seen the target there); training unrolls ``--train-depth`` depths.

Data: the target's own greedy answers (128 new tokens, no stop token, as ``bench_speculative``
times them) to train-split Wikipedia chat prompts, and held-out prompts for the measurement.
Acceptance is simulated exactly for greedy decoding: from a start position c of an answer, the
draft proposes K tokens (the feature draft with the target's features up to c, its own after),
and a draft is accepted while it equals the target's argmax; a chain stops where the data
leaves the target's own argmax path. Reported: top-1 agreement and the mean accepted drafts per
round at K = 1..``--max-k`` for both drafts, on the same start positions.

    python3 benchmarks/feature_draft.py --out DIR --target HYBRID_DIR [--draft-from smollm2-135m-instruct]
        [--train-prompts 2048] [--eval-prompts 64] [--steps 400] [--time-budget-s 120]
    python3 benchmarks/feature_draft.py --out DIR --tiny      # random tiny models, anywhere

Writes DIR/feature_draft.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench_speculative import render_prompts

from mambaify.distill.losses import distill_loss
from mambaify.draft import build_draft_from_teacher, parse_layers


class FeatureDraft(nn.Module):
    """One decoder layer (a 1-layer model of the teacher's family, with its final norm and head)
    over ``fc([embed(x_s), feature_{s-1}])``. ``fc`` starts as the sum of the two halves."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        width = body.config.hidden_size
        self.fc = nn.Linear(2 * width, width, bias=False, dtype=body.dtype, device=body.device)
        with torch.no_grad():
            self.fc.weight.copy_(torch.cat([torch.eye(width), torch.eye(width)], 1))

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor, attention_mask: torch.Tensor):
        """input_ids (b,t); features (b,t,d): the feature each position reads (the one before it);
        -> (hidden (b,t,d) after the final norm, logits (b,t,V))."""
        embeds = self.body.get_input_embeddings()(input_ids)
        inputs = self.fc(torch.cat([embeds, features.to(embeds.dtype)], -1))
        hidden = self.body.model(inputs_embeds=inputs, attention_mask=attention_mask).last_hidden_state
        return hidden, self.body.lm_head(hidden)


def shifted(features: torch.Tensor) -> torch.Tensor:
    """The feature each position reads: the one of the position before (zeros at position 0)."""
    return F.pad(features[:, :-1], (0, 0, 1, 0))


# ---------------------------------------------------------------------------------------------
# Data: the target's own greedy answers


def answer_rows(target, tokenizer, prompts: list[list[int]], new_tokens: int, batch_size: int, pad_id: int):
    """Right-padded rows prompt + the target's greedy answer: (input_ids, attention_mask,
    answer_mask), answer_mask marking the positions whose NEXT token is an answer token."""
    from mambaify.generate.engine import Engine

    width = max(len(p) for p in prompts) + new_tokens
    engine = Engine(target, tokenizer, max_batch_size=batch_size, max_length=width)
    rows = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        answers = engine.generate(batch, max_new_tokens=new_tokens, stop_token_ids=[]).cpu()
        rows += [(p, a.tolist()) for p, a in zip(batch, answers)]
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    answer = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, (prompt, reply) in enumerate(rows):
        n = len(prompt) + len(reply)
        ids[r, :n] = torch.tensor(prompt + reply)
        mask[r, :n] = 1
        answer[r, len(prompt) - 1 : n - 1] = True
    return ids, mask, answer


@torch.no_grad()
def target_outputs(target, ids: torch.Tensor, mask: torch.Tensor):
    """The target's final (normed) hidden states and logits."""
    hidden = target.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden, target.lm_head(hidden)


# ---------------------------------------------------------------------------------------------
# Training


def kl_to_target(draft_logits: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, answer: torch.Tensor):
    """KL(target || draft) per answer position (distill-draft's loss). ``answer`` marks positions
    whose next token is an answer token; distill_loss's mask marks the predicted tokens."""
    scored_tokens = F.pad(answer[:, :-1], (1, 0))
    return distill_loss(draft_logits, logits, ids, scored_tokens)["loss"]


def feature_draft_loss(draft: FeatureDraft, ids, mask, answer, features, logits, depth: int, feature_weight: float):
    """Mean over ``depth`` unrolled depths of KL(target || draft) + feature_weight * smooth-L1
    (draft hidden, target feature), on answer positions. Depth 1 reads the target's features;
    depth j the draft's own depth-(j-1) outputs (detached), as it would in a round."""
    reads, total = shifted(features), 0.0
    for _ in range(depth):
        hidden, draft_logits = draft(ids, reads, mask)
        kl = kl_to_target(draft_logits, logits, ids, answer)
        pull = F.smooth_l1_loss(hidden[answer].float(), features[answer].float())
        total = total + kl + feature_weight * pull
        reads = shifted(hidden.detach())
    return total / depth


def train(drafts: dict, target, ids, mask, answer, args, device) -> dict:
    """Both drafts on the same batches, in the same order; returns each one's loss curve."""
    optimizers = {name: torch.optim.AdamW(d.parameters(), lr=args.lr, weight_decay=0.0) for name, d in drafts.items()}
    curves = {name: [] for name in drafts}
    spent = dict.fromkeys(drafts, 0.0)
    g = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        pick = torch.randint(0, ids.shape[0], (args.batch_size,), generator=g)
        b_ids, b_mask, b_answer = ids[pick].to(device), mask[pick].to(device), answer[pick].to(device)
        features, logits = target_outputs(target, b_ids, b_mask)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for name, draft in drafts.items():
            if spent[name] > args.time_budget_s:
                continue
            start = time.perf_counter()
            for group in optimizers[name].param_groups:
                group["lr"] = lr
            draft.train()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                if name == "feature":
                    loss = feature_draft_loss(draft, b_ids, b_mask, b_answer, features, logits,
                                              args.train_depth, args.feature_weight)
                else:
                    loss = kl_to_target(draft(input_ids=b_ids, attention_mask=b_mask).logits, logits, b_ids, b_answer)
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
            optimizers[name].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            spent[name] += time.perf_counter() - start
            curves[name].append(round(float(loss.detach()), 4))
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step + 1}/{args.steps}: " + ", ".join(f"{n} {c[-1]:.3f}" for n, c in curves.items() if c),
                  flush=True)
    return {name: dict(losses=curves[name], steps=len(curves[name]), seconds=round(spent[name], 1)) for name in drafts}


# ---------------------------------------------------------------------------------------------
# Measuring: greedy acceptance, simulated exactly


def accepted_run(matches: torch.Tensor, on_path: torch.Tensor, max_k: int) -> torch.Tensor:
    """matches (n, max_k) bool: depth j's draft equals the target's argmax; on_path (n, max_k):
    the data follows that argmax there, so depth j + 1 reads a token the target would emit.
    -> (n, max_k): drafts accepted at K = 1..max_k, the leading run of matches (cut where the
    data leaves the target's path)."""
    alive = torch.ones(matches.shape[0], dtype=torch.long, device=matches.device)
    counts = []
    for j in range(max_k):
        alive = alive * matches[:, j].long()
        counts.append(alive.clone())
        alive = alive * on_path[:, j].long()
    return torch.stack(counts, 1).cumsum(1)


@torch.no_grad()
def measure(drafts: dict, target, ids, mask, answer, starts_per_row: int, max_k: int, device, seed: int) -> dict:
    """Top-1 agreement on every answer position, and the accepted drafts per round at
    K = 1..max_k from ``starts_per_row`` random answer positions of each row (the same for both drafts)."""
    g = torch.Generator().manual_seed(seed)
    results = {name: dict(agree=0, positions=0, accepted=torch.zeros(max_k, dtype=torch.float64), rounds=0)
               for name in drafts}
    for r in range(ids.shape[0]):
        row_ids, row_mask = ids[r : r + 1].to(device), mask[r : r + 1].to(device)
        features, logits = target_outputs(target, row_ids, row_mask)
        chosen = logits[0].argmax(-1)  # the target's greedy token after each position
        next_ids = F.pad(row_ids[0, 1:], (0, 1), value=-1)
        on_path = chosen == next_ids
        positions = answer[r].nonzero()[:, 0].to(device)
        usable = positions[positions + max_k <= positions.max()]  # a whole chain inside the answer
        starts = usable[torch.randperm(len(usable), generator=g)[:starts_per_row].to(device)]
        depth = torch.arange(max_k, device=device)
        at = starts[:, None] + depth  # the position of depth j's proposal, chain by chain
        for name, draft in drafts.items():
            draft.eval()
            if name == "feature":
                _, first = draft(row_ids, shifted(features), row_mask)
                proposals = chain_proposals(draft, row_ids, row_mask, features, starts, max_k)
            else:
                first = draft(input_ids=row_ids, attention_mask=row_mask).logits
                proposals = first[0].argmax(-1)[at]  # a token draft's chain reads the data: teacher-forced
            stats = results[name]
            stats["agree"] += int((first[0].argmax(-1) == chosen)[positions].sum())
            stats["positions"] += len(positions)
            stats["accepted"] += accepted_run(proposals == chosen[at], on_path[at], max_k).sum(0).double().cpu()
            stats["rounds"] += len(starts)
    return {name: dict(top1_agreement=s["agree"] / max(s["positions"], 1), positions=s["positions"], rounds=s["rounds"],
                       mean_accepted={k + 1: round(float(s["accepted"][k]) / max(s["rounds"], 1), 4)
                                      for k in range(max_k)})
            for name, s in results.items()}


def chain_proposals(draft: FeatureDraft, ids, mask, features, starts: torch.Tensor, max_k: int) -> torch.Tensor:
    """(chains, max_k): the feature draft's greedy proposals from each start c, as a round runs
    them. Depth 1 at position c reads the target's feature of c - 1; depth j at c + j - 1 reads
    its own depth-(j-1) output, every earlier position keeping the target's features (committed
    tokens). One batched forward per depth, a row per chain; the tokens are the data's, which a
    chain follows while its proposals are accepted (the caller cuts the rest)."""
    n = len(starts)
    reads = shifted(features).expand(n, -1, -1).clone()
    rows = ids.expand(n, -1)
    row_mask = mask.expand(n, -1)
    chain = torch.arange(n, device=ids.device)
    proposals = []
    for j in range(max_k):
        hidden, logits = draft(rows, reads, row_mask)
        at = starts + j
        proposals.append(logits[chain, at].argmax(-1))
        if j + 1 < max_k:
            reads[chain, at + 1] = hidden[chain, at].to(reads.dtype)
    return torch.stack(proposals, 1)


# ---------------------------------------------------------------------------------------------


def load_models(args, device: torch.device, dtype: torch.dtype):
    """(target, the teacher the drafts are built from, tokenizer or None with --tiny)."""
    if args.tiny:
        import mambaify
        from mambaify.bench import build_teacher

        teacher = build_teacher("tiny", device, dtype)
        return mambaify.convert(teacher, attention=0.5).eval(), teacher, None
    from mambaify.generate.loading import load_for_generation

    target, tokenizer = load_for_generation(args.target, device=str(device), dtype=str(dtype).split(".")[-1])
    teacher, _ = load_for_generation(args.draft_from, device=str(device), dtype=str(dtype).split(".")[-1])
    return target, teacher, tokenizer


def prompt_sets(args, tokenizer, vocab_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(train prompts, held-out prompts): chat-rendered Wikipedia prompts, or random ids with --tiny."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(args.seed)
        def draw(count):
            return [torch.randint(3, vocab_size, (int(n),), generator=g).tolist()
                    for n in torch.randint(4, 12, (count,), generator=g)]
        return draw(args.train_prompts), draw(args.eval_prompts)
    from mambaify.distill import data as D

    train_texts, eval_texts = D.wiki_prompt_sets(args.train_prompts, args.eval_prompts, seed=args.seed)
    return render_prompts(tokenizer, train_texts), render_prompts(tokenizer, eval_texts)


def render(data: dict, out: Path) -> None:
    max_k = data["meta"]["max_k"]
    lines = ["# Token draft vs feature draft", "",
             f"Target {data['meta']['target']}, drafts from {data['meta']['draft_from']}; "
             f"{data['meta']['train_rows']} training answers, {data['meta']['eval_rows']} held-out; "
             f"device {data['meta']['device']}.", "",
             "| draft | layers | trained steps | seconds | top-1 agreement | "
             + " | ".join(f"accepted at K={k}" for k in range(1, max_k + 1)) + " |",
             "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in range(max_k)) + " |"]
    for name, m in data["drafts"].items():
        accepted = " | ".join(f"{m['mean_accepted'][str(k)]:.3f}" for k in range(1, max_k + 1))
        lines.append(f"| {name} | {m['layers']} | {m['steps']} | {m['seconds']} | {m['top1_agreement']:.3f} | {accepted} |")
    (out / "feature_draft.md").write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--target", help="the target (a saved hybrid folder, or a teacher name)")
    p.add_argument("--draft-from", default="smollm2-135m-instruct", help="the teacher the drafts are built from")
    p.add_argument("--tiny", action="store_true", help="a random tiny hybrid and its teacher (for tests)")
    p.add_argument("--train-prompts", type=int, default=2048)
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128, help="answer tokens per prompt (default 128)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--time-budget-s", type=float, default=float("inf"), help="per draft: stop its training after this")
    p.add_argument("--token-layers", type=parse_layers, default=[0, -1],
                   help="the teacher's layers the token draft is made of (default 0,-1, distill-draft's)")
    p.add_argument("--feature-layers", type=parse_layers, default=[-1],
                   help="the teacher's layers the feature draft is made of (default -1, its last)")
    p.add_argument("--train-depth", type=int, default=2, help="the feature draft's unrolled depths in training")
    p.add_argument("--feature-weight", type=float, default=1.0)
    p.add_argument("--max-k", type=int, default=6)
    p.add_argument("--starts-per-row", type=int, default=32)
    p.add_argument("--generate-batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.tiny and not args.target:
        print("give --target (a saved hybrid), or --tiny", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    target, teacher, tokenizer = load_models(args, device, dtype)
    pad = tokenizer.pad_token_id if tokenizer is not None else 0
    train_prompts, eval_prompts = prompt_sets(args, tokenizer, target.config.vocab_size)
    start = time.perf_counter()
    train_rows = answer_rows(target, tokenizer, train_prompts, args.new_tokens, args.generate_batch, pad)
    eval_rows = answer_rows(target, tokenizer, eval_prompts, args.new_tokens, args.generate_batch, pad)
    print(f"{len(train_prompts)} + {len(eval_prompts)} answers of {args.new_tokens} tokens in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    # The drafts train in float32 (bf16 autocast on CUDA); the target stays in its dtype.
    drafts = {"token": build_draft_from_teacher(teacher, layers=args.token_layers, dtype=torch.float32),
              "feature": FeatureDraft(build_draft_from_teacher(teacher, layers=args.feature_layers, dtype=torch.float32))}
    layers = {"token": drafts["token"].config.num_hidden_layers, "feature": drafts["feature"].body.config.num_hidden_layers}
    training = train(drafts, target, *train_rows, args, device)
    measured = measure(drafts, target, *eval_rows, args.starts_per_row, args.max_k, device, args.seed)
    data = dict(meta=dict(target="tiny" if args.tiny else args.target, draft_from="tiny" if args.tiny else args.draft_from,
                          device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                          train_rows=len(train_prompts), eval_rows=len(eval_prompts), max_k=args.max_k,
                          options={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                   if k != "time_budget_s" or math.isfinite(v)}),
                drafts={name: dict(layers=layers[name], **measured[name], **training[name]) for name in drafts})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "feature_draft.json").write_text(json.dumps(data, indent=1))
    render(json.loads(json.dumps(data)), args.out)
    print((args.out / "feature_draft.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
