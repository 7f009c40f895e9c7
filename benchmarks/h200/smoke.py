"""GPU smoke test of the CUDA paths the CPU tests cannot reach: bf16 autocast training through
accelerate, and cached generation on the device. Usage: python3 benchmarks/h200/smoke.py OUT_DIR"""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import mambaify  # noqa: E402
from mambaify.distill.trainer import DistillConfig, distill  # noqa: E402
from tests._tiny_data import CORPUS, tiny_llama, tiny_tokenizer  # noqa: E402

out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
assert torch.cuda.is_available(), "no CUDA device"
print("device:", torch.cuda.get_device_name(), "torch", torch.__version__)

work = Path(tempfile.mkdtemp())
tok = tiny_tokenizer()
teacher = tiny_llama(tok)
teacher.save_pretrained(work / "teacher")
tok.save_pretrained(work / "teacher")
with open(work / "chat.jsonl", "w") as f:
    for i, text in enumerate(CORPUS):
        f.write(json.dumps({"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": text}]}) + "\n")
(work / "heldout.txt").write_text("\n\n".join(CORPUS[:6]))

t0 = time.time()
cfg = DistillConfig(teacher=str(work / "teacher"), out=str(work / "run"), data=str(work / "chat.jsonl"),
                    eval_data=str(work / "heldout.txt"), tokens=6 * 4 * 64, seq_len=64, batch_size=4,
                    eval_texts=6, eval_chats=0, eval_generations=0, progress=False, save_every=3, lr=3e-3)
metrics = distill(cfg)
print(f"tiny distill on cuda: {time.time() - t0:.1f}s, KL {metrics['before']['text']['kl']:.4f} -> {metrics['after']['text']['kl']:.4f}")
assert metrics["after"]["text"]["kl"] < metrics["before"]["text"]["kl"]

hybrid = mambaify.convert(teacher.cuda(), attention=0.5).eval()
prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]
width = max(map(len, prompts))
ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts], device="cuda")
mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device="cuda")
batch = hybrid.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
for i, p in enumerate(prompts):
    alone = torch.tensor([p], device="cuda")
    single = hybrid.generate(alone, attention_mask=torch.ones_like(alone), max_new_tokens=12, do_sample=False)
    n = single.shape[1] - len(p)
    assert batch[i, width:width + n].tolist() == single[0, len(p):].tolist(), (batch[i], single[0])
print("left-padded batch generation on cuda equals one-by-one: OK")
(out / "smoke.json").write_text(json.dumps({"ok": True, "metrics_after": metrics["after"]["text"]}, indent=2))
