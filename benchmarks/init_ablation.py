"""How far the freshly converted hybrid starts from its teacher, by initialisation of the new
Mamba parameters (no training). Usage: python benchmarks/init_ablation.py [--texts 16] [--attention 0.5]

Every row converts with ``convert(..., init="paper")`` or ``init="linear-attention"`` and then
changes one thing in every converted mixer, so each piece of the linear-attention init is
measured on its own as well as together; the silenced row (out_proj = 0: the layers removed) is
the floor to beat. The neutral-gate rows set every z row of in_proj to the same vector c*mu/|mu|^2,
mu the mean input of that layer on 16 training-split summaries, so silu(z) is one positive number
per token, which the gated RMSNorm divides out (the model has no in_proj bias to do it with).
"""

import argparse
import math

import torch

from mambaify import convert, load_teacher
from mambaify.convert import LINEAR_ATTENTION_DT
from mambaify.distill import data as D
from mambaify.eval.metrics import compare_on_documents


def identity_conv(mixer, _) -> None:
    mixer.conv1d.weight.zero_()
    mixer.conv1d.weight[:, 0, -1] = 1
    mixer.conv1d.bias.zero_()


def out_scale(s):
    def change(mixer, _):
        mixer.out_proj.weight.mul_(s)
    return change


def long_memory_no_skip(mixer, _) -> None:
    """dt = LINEAR_ATTENTION_DT and A = -1 for every head (dt rows of in_proj zero), D = 0."""
    mixer.in_proj.weight[mixer.in_proj_slices["dt"]].zero_()
    dt = torch.tensor(LINEAR_ATTENTION_DT, dtype=torch.float64)
    mixer.dt_bias.fill_(float(dt + torch.log(-torch.expm1(-dt))))
    mixer.A_log.zero_()
    mixer.D.zero_()


def fast_decay(mixer, _) -> None:
    """dt = 0.1 and A = -8: exp(dt A) = 0.45 a token, a memory of a couple of tokens."""
    mixer.in_proj.weight[mixer.in_proj_slices["dt"]].zero_()
    dt = torch.tensor(0.1, dtype=torch.float64)
    mixer.dt_bias.fill_(float(dt + torch.log(-torch.expm1(-dt))))
    mixer.A_log.fill_(math.log(8.0))


def neutral_gate(mixer, layer_means) -> None:
    mu = layer_means[mixer.layer_idx]
    rows = mixer.in_proj.weight[mixer.in_proj_slices["z"]]
    rows.copy_((4.0 * mu / mu.dot(mu)).expand_as(rows))


def silence(mixer, _) -> None:
    mixer.out_proj.weight.zero_()


def both(*changes):
    def change(mixer, means):
        for c in changes:
            c(mixer, means)
    return change


# (row label, init passed to convert, change applied afterwards to every converted mixer)
VARIANTS = [
    ("paper init (random gate z and dt, default conv)", "paper", None),
    ("paper + identity conv", "paper", identity_conv),
    ("paper + identity conv + neutral gate", "paper", both(identity_conv, neutral_gate)),
    ("paper + identity conv + fast decay (dt 0.1, A -8), out 0.1 W_O", "paper", both(identity_conv, fast_decay, out_scale(0.1))),
    ("paper, out_proj = 0.3 W_O", "paper", out_scale(0.3)),
    ("paper, out_proj = 0.1 W_O", "paper", out_scale(0.1)),
    ("paper + identity conv, out_proj = 0.1 W_O", "paper", both(identity_conv, out_scale(0.1))),
    ("paper + identity conv + neutral gate, out_proj = 0.1 W_O", "paper", both(identity_conv, neutral_gate, out_scale(0.1))),
    ("identity conv + long memory, D = 0 (out_proj = W_O)", "paper", both(identity_conv, long_memory_no_skip)),
    ("**linear-attention** (identity conv, long memory, D = 0, out_proj = 0.1 W_O)", "linear-attention", None),
    ("linear-attention with out_proj = 0.3 W_O", "linear-attention", out_scale(3.0)),
    ("linear-attention with out_proj = 0.03 W_O", "linear-attention", out_scale(0.3)),
    ("linear-attention with the paper's default conv", "paper", both(long_memory_no_skip, out_scale(0.1))),
    ("converted mixers silenced (out_proj = 0: layers removed)", "paper", silence),
]


@torch.no_grad()
def mean_layer_inputs(teacher, docs) -> dict[int, torch.Tensor]:
    """Per layer, the mean input of its attention (after input_layernorm), first tokens left out."""
    seen: dict[int, list[torch.Tensor]] = {}

    def hook(i):
        def record(module, args, kwargs, out):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            seen.setdefault(i, []).append(x[:, 1:].reshape(-1, x.shape[-1]))
        return record

    handles = [layer.self_attn.register_forward_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(teacher.model.layers)]
    for doc in docs:
        teacher(torch.tensor([doc["input_ids"]]))
    for h in handles:
        h.remove()
    return {i: torch.cat(xs).mean(0) for i, xs in seen.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--attention", type=float, default=0.5)
    parser.add_argument("--texts", type=int, default=16, help="held-out Wikipedia summaries")
    args = parser.parse_args()
    teacher, tokenizer = load_teacher(args.teacher)
    docs = [D.tokenize_text(tokenizer, text, max_length=128) for text in D.wiki_heldout_texts(args.texts)]
    train, _ = D.wiki_split()
    calibration = [D.tokenize_text(tokenizer, r["summary"], max_length=128) for r in train[:16]]
    means = mean_layer_inputs(teacher, calibration)
    print("| init | perplexity | KL(teacher‖student) | top-1 agreement |\n| --- | --- | --- | --- |")
    for name, init, change in VARIANTS:
        hybrid = convert(teacher, attention=args.attention, init=init)
        with torch.no_grad():
            for layer in hybrid.model.layers:
                if change is not None and not layer.is_attention:
                    change(layer.mamba, means)
        r = compare_on_documents(hybrid, teacher, docs, progress=False)
        print(f"| {name} | {r['student_ppl']:,.0f} | {r['kl']:.2f} | {r['top1_agreement']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
