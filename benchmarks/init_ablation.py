"""How far the freshly converted hybrid starts from its teacher, by initialisation of the new
Mamba parameters (no training). Usage: python benchmarks/init_ablation.py [--texts 16] [--attention 0.5]

Variants: the paper's init (random gate z and dt, default conv); the same with an identity conv;
and the converted mixers silenced (out_proj = 0), i.e. the layers removed, as a floor to beat.
"""

import argparse

import torch

from mambaify import convert, load_teacher
from mambaify.distill import data as D
from mambaify.eval.metrics import compare_on_documents


def identity_conv(mixer) -> None:
    mixer.conv1d.weight.zero_()
    mixer.conv1d.weight[:, 0, -1] = 1
    mixer.conv1d.bias.zero_()


def silence(mixer) -> None:
    mixer.out_proj.weight.zero_()


VARIANTS = {"paper init": None, "identity conv": identity_conv, "converted mixers silenced": silence}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--attention", type=float, default=0.5)
    parser.add_argument("--texts", type=int, default=16, help="held-out Wikipedia summaries")
    args = parser.parse_args()
    teacher, tokenizer = load_teacher(args.teacher)
    docs = [D.tokenize_text(tokenizer, text, max_length=128) for text in D.wiki_heldout_texts(args.texts)]
    print("| init | perplexity | KL(teacher‖student) | top-1 agreement |\n| --- | --- | --- | --- |")
    for name, change in VARIANTS.items():
        hybrid = convert(teacher, attention=args.attention)
        with torch.no_grad():
            for layer in hybrid.model.layers:
                if change is not None and not layer.is_attention:
                    change(layer.mamba)
        r = compare_on_documents(hybrid, teacher, docs, progress=False)
        print(f"| {name} | {r['student_ppl']:,.0f} | {r['kl']:.2f} | {r['top1_agreement']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
