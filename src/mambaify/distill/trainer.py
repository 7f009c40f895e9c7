"""The distillation run: data, stages, a plain training loop, checkpoints, evaluation, report.

One process or many: the loop goes through ``accelerate``, so the same code runs on one CPU,
one GPU, or under ``accelerate launch`` / ``torchrun`` with data parallelism, or sharded with
FSDP when accelerate is configured for it. Read :func:`distill` top to bottom; each stage of a
schedule is a call of :func:`train_stage`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, DistributedType
from tqdm.auto import tqdm

from ..convert import check_init, convert
from ..fileio import replace_directory, write_json_atomic
from ..models.modeling import HybridForCausalLM
from . import data as D
from .losses import distill_loss_from_hidden
from .schedule import Stage, parse_fraction, plan_stages

log = logging.getLogger(__name__)


class RunInterrupted(RuntimeError):
    """Raised by ``stop_after_steps``: stands in for a crash or a kill, for testing resume."""

STAGE_DEFAULTS = {
    # Paper stage 1: only the Mamba layers train, CE on the pseudo-labels plus a little KL.
    "stage1": dict(kl_weight=0.1, ce_weight=1.0, lr=1e-3),
    # End-to-end: everything trains on the teacher's distribution (KL only).
    "e2e": dict(kl_weight=1.0, ce_weight=0.0, lr=1e-4),
}


# The token count of a run that a time budget alone ends (see DistillConfig.from_flags).
TOKENS_UNTIL_THE_BUDGET = 10**12


@dataclass
class DistillConfig:
    """Every option of a run; a YAML file can hold any subset (see ``mambaify distill --help``)."""

    teacher: str = "smollm2-135m-instruct"
    out: str = "runs/demo"
    attention: Any = 0.5  # fraction or list of indices; the first stage of a schedule
    schedule: str | None = None  # "0.5,0.25,0.125" (progressive) or "stepwise:0.25"
    stage: str = "stage1"  # "stage1" (Mamba only) or "e2e" (everything)
    # How converted layers' new Mamba parameters start. "linear-attention" (identity conv, long
    # memory, out_proj = 0.1 W_O) starts near "layer removed" and trains far faster than the paper's
    # random init (RESULTS.md, init section: held-out KL 1.29 vs 5.86 at equal tokens).
    init: str = "linear-attention"
    data: str = "builtin"  # "builtin", a .jsonl/.txt path, or an HF dataset name
    eval_data: str | None = None  # held-out text for perplexity (default: built-in Wikipedia)
    # The defaults are a demo budget that finishes on a 2-core CPU in about 10 minutes;
    # configs/ holds real budgets (e.g. configs/h200-smollm2-attn50.yaml).
    tokens: int = 32_768  # training tokens per stage (fed, scored or not)
    seq_len: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    lr: float | None = None  # default depends on the stage
    min_lr_ratio: float = 0.1
    warmup: float = 0.05  # fraction of the steps
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    kl_weight: float | None = None
    ce_weight: float | None = None
    temperature: float = 1.0
    reverse_kl: bool = False
    num_prompts: int = 64  # built-in data: prompts the teacher answers (pseudo-labels)
    label_tokens: int = 64  # longest pseudo-label response
    label_batch_size: int = 32
    text_docs: int = 256  # built-in data: Wikipedia summaries for plain-text KD
    eval_texts: int = 32
    eval_chats: int = 8
    eval_generations: int = 2
    eval_max_new_tokens: int = 32
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "bf16", "fp32"
    teacher_dtype: str = "auto"
    save_every: int = 100  # steps between checkpoints
    # Cap on each stage's training time (shortens the schedule); on the command line, a budget
    # with no token count trains for the budget (DistillConfig.from_flags).
    time_budget_s: float | None = None
    gradient_checkpointing: bool = False
    # torch.compile the student's and the teacher's forward for the training steps (inductor
    # fuses the norms, activations and residual adds; fla's scans stay outside the graph). The
    # first step pays the compile, inside the time budget. Off: comparable to earlier runs.
    compile: bool = False
    progress: bool = True

    def stage_defaults(self) -> dict:
        if self.stage not in STAGE_DEFAULTS:
            raise ValueError(f"--stage must be one of {', '.join(STAGE_DEFAULTS)}, got {self.stage!r}")
        d = STAGE_DEFAULTS[self.stage]
        return {
            "lr": self.lr if self.lr is not None else d["lr"],
            "kl_weight": self.kl_weight if self.kl_weight is not None else d["kl_weight"],
            "ce_weight": self.ce_weight if self.ce_weight is not None else d["ce_weight"],
        }

    def validate(self) -> None:
        self.stage_defaults()
        for name in ("tokens", "seq_len", "batch_size", "grad_accum"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.seq_len > 1 << 17:
            raise ValueError(f"--seq-len {self.seq_len} is beyond what any supported teacher handles")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no CUDA GPU here: use --device auto or cpu, or a CUDA build of torch")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"--precision must be auto, bf16 or fp32, got {self.precision!r}")
        try:
            check_init(self.init)
        except ValueError as err:
            raise ValueError(f"--init: {err}") from None
        # Fractions are checked here, before the teacher loads; layer indices once its depth is known.
        fractions = [self.attention] if isinstance(self.attention, (int, float)) else []
        if self.schedule:
            entries = self.schedule.strip().removeprefix("stepwise:").split(",")
            fractions += [parse_fraction(entry) for entry in entries if entry.strip()]
        bad = [f for f in fractions if isinstance(f, bool) or not 0.0 <= float(f) <= 1.0]
        if bad:
            raise ValueError(f"attention fractions must be in [0, 1] (--attention, --schedule), got {bad[0]}")

    @classmethod
    def _read_yaml(cls, path: str | os.PathLike) -> dict[str, Any]:
        """The options a YAML file sets, checked to be options of this config."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path} must hold a mapping of option: value")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown option(s) in {path}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return raw

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides) -> "DistillConfig":
        raw = cls._read_yaml(path)
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**raw)

    @classmethod
    def from_flags(cls, config: str | os.PathLike | None, flags: dict[str, Any],
                   resume: bool = False) -> "DistillConfig":
        """A command line's options: the YAML file (if any), the flags given (not None) on top.

        With ``resume``, under both, the options the run in ``out`` was started with (its
        ``config.yaml``): ``--resume --out DIR`` continues a run without its command line
        repeated, and an option given that changes what the steps compute is still refused
        (:func:`_check_run_dir`).

        A time budget with no token count, in the file or the flags, trains for the budget: the
        demo default of ``tokens`` would otherwise end the run after a step or two at real batch
        sizes, long before the budget (so a budget only ever shortens a given token count).
        """
        given = {k: v for k, v in flags.items() if v is not None}
        options = {**(cls._read_yaml(config) if config else {}), **given}
        if resume:
            started = Path(options.get("out", cls.out)) / "config.yaml"
            if started.is_file():
                options = {**cls._read_yaml(started), **options}
        if options.get("time_budget_s") is not None and "tokens" not in options:
            options["tokens"] = TOKENS_UNTIL_THE_BUDGET
        return cls(**options)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass
class RunData:
    train_docs: list[dict]
    eval_text_docs: list[dict]
    eval_chat_docs: list[dict]
    eval_prompts: list[str]


def prepare_data(cfg: DistillConfig, teacher, tokenizer, run_dir: Path, accelerator: Accelerator) -> RunData:
    """Training documents (teacher pseudo-labels and real text) and held-out evaluation sets.

    Pseudo-labels are generated once by the main process, cached in the run directory and
    reused on resume.
    """
    data_dir = run_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    builtin = cfg.data == "builtin"
    heldout: list[str] = []  # real text for perplexity
    if cfg.eval_texts and cfg.eval_data:
        heldout = [r["text"] for r in D.load_source(cfg.eval_data) if "text" in r]
    elif cfg.eval_texts:
        heldout = D.wiki_heldout_texts(cfg.eval_texts)

    if builtin:
        train_prompts, eval_prompts_all = D.wiki_prompt_sets(cfg.num_prompts, cfg.eval_chats + cfg.eval_generations,
                                                             seed=cfg.seed)
        records_path = data_dir / "pseudo_labels.jsonl"
        if accelerator.is_main_process:
            D.generate_pseudo_labels(
                teacher, tokenizer, train_prompts, records_path,
                max_new_tokens=cfg.label_tokens, batch_size=cfg.label_batch_size, seed=cfg.seed,
                progress=cfg.progress,
            )
        accelerator.wait_for_everyone()
        records = D.load_source(records_path)
        train_wiki, _ = D.wiki_split()
        rng = random.Random(cfg.seed)
        texts = [r["summary"] for r in rng.sample(train_wiki, min(cfg.text_docs, len(train_wiki)))]
        records = records + [{"text": t} for t in texts]
    else:
        records = D.load_source(cfg.data)
        n_eval = cfg.eval_chats + cfg.eval_generations
        eval_prompts_all = D.wiki_prompts(n_eval, seed=cfg.seed + 1) if n_eval else []
    train_docs = D.tokenize_records(tokenizer, records, max_length=cfg.seq_len)
    train_docs = [d for d in train_docs if sum(d["loss_mask"]) > 0]
    if not train_docs:
        raise D.DataError(f"no trainable tokens in {cfg.data!r}: every document is empty after tokenisation")

    # Held-out chat responses: the teacher answers prompts that no pseudo-label uses.
    chat_prompts = eval_prompts_all[: cfg.eval_chats]
    chat_path = data_dir / "heldout_labels.jsonl"
    if accelerator.is_main_process and chat_prompts:
        D.generate_pseudo_labels(
            teacher, tokenizer, chat_prompts, chat_path,
            max_new_tokens=cfg.label_tokens, batch_size=cfg.label_batch_size, seed=cfg.seed + 1,
            progress=cfg.progress,
        )
    accelerator.wait_for_everyone()
    chat_docs = D.tokenize_records(tokenizer, D.load_source(chat_path), max_length=cfg.seq_len) if chat_prompts else []
    text_docs = [D.tokenize_text(tokenizer, t, max_length=cfg.seq_len) for t in heldout[: cfg.eval_texts]]
    return RunData(train_docs, text_docs, chat_docs, eval_prompts_all[cfg.eval_chats :][: cfg.eval_generations])


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def check_memory(cfg: DistillConfig, config, device: torch.device, bf16: bool, shards: int = 1) -> None:
    """Refuse settings whose activations alone would not fit, before spending minutes on data.

    A coarse upper estimate: per token and layer the forward keeps about 10 hidden-size and 4
    intermediate-size vectors for the backward (fewer with gradient checkpointing); weights are
    counted as student (float32, with grads and Adam moments; split over ``shards`` processes
    under FSDP) plus teacher.
    """
    import psutil

    tokens = cfg.batch_size * cfg.seq_len
    per_token_layer = (10 * config.hidden_size + 4 * config.intermediate_size) * (2 if bf16 else 4)
    layers = 2 if cfg.gradient_checkpointing else config.num_hidden_layers
    params = config.num_hidden_layers * (4 * config.hidden_size**2 + 3 * config.hidden_size * config.intermediate_size)
    params += 2 * config.vocab_size * config.hidden_size
    need = tokens * layers * per_token_layer + params * (16 / shards + (2 if bf16 else 4))
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = psutil.virtual_memory().available
    if need > 0.9 * free:
        raise ValueError(
            f"--batch-size {cfg.batch_size} x --seq-len {cfg.seq_len} needs about {need / 2**30:.1f} GiB "
            f"but {free / 2**30:.1f} GiB is free on {device}; lower --batch-size (and raise --grad-accum to keep "
            "the tokens per step), shorten --seq-len, or set gradient_checkpointing: true"
            + ("" if shards > 1 else "; on several GPUs, FSDP shards the student (accelerate launch --use_fsdp)")
        )


def set_trainable(student: HybridForCausalLM, stage: str) -> list[torch.nn.Parameter]:
    """Stage 1: only the Mamba mixers train; end-to-end: everything does."""
    for name, p in student.named_parameters():
        p.requires_grad_(stage == "e2e" or ".mamba." in name)
    return [p for p in student.parameters() if p.requires_grad]


def make_optimizer(params: list[torch.nn.Parameter], lr: float, cfg: DistillConfig) -> torch.optim.AdamW:
    decay = [p for p in params if p.ndim >= 2 and not getattr(p, "_no_weight_decay", False)]
    no_decay = [p for p in params if not (p.ndim >= 2 and not getattr(p, "_no_weight_decay", False))]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(cfg.betas))


def warmup_cosine(plan: dict, warmup: float, min_ratio: float):
    """Linear warm-up then cosine decay over ``plan["total"]`` steps (read at every step, so a
    time budget can shorten the run once the step time is known)."""

    def factor(step: int) -> float:
        total = plan["total"]
        warmup_steps = max(1, round(warmup * total))
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def final_hidden(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last hidden state (after the final norm) through the model's own forward, so DDP/FSDP
    wrappers see the call; logits are made for one position only, the loss makes the rest."""
    out = model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        output_hidden_states=True,
        use_cache=False,
        logits_to_keep=1,
    )
    return out.hidden_states[-1]


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` through torch.compile for training steps: static shapes (every micro-batch is
    [batch_size, seq_len]), graph breaks allowed (the fla scan is compiler-disabled on purpose)."""
    return torch.compile(model, dynamic=False)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _optimizer_state(accelerator: Accelerator, student, optimizer) -> dict:
    """The optimizer's whole state for a checkpoint (every process calls this; under FSDP it gathers).

    Under FSDP each process holds the moments of its own shards only, so they are gathered into
    one state keyed by parameter names, which any number of processes can load back. Otherwise
    every process holds all of it, and the checkpoint keeps torch's own format.
    """
    if accelerator.distributed_type != DistributedType.FSDP:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(accelerator.unwrap_model(student), optimizer.optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_optimizer_state(accelerator: Accelerator, student, optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer state into the prepared optimizer (each process takes its share)."""
    keyed_by_name = any(isinstance(key, str) for key in state.get("state", {}))  # as _optimizer_state gathers it
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if sharded and state.get("state") and not keyed_by_name:
        raise ValueError("this checkpoint was written without FSDP; resume it without FSDP (plain data "
                         "parallelism or one process), or start a new run under FSDP")
    if keyed_by_name or sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(accelerator.unwrap_model(student), optimizer.optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def student_shards(accelerator: Accelerator) -> int:
    """How many processes share the student's weights and optimizer state: all of them under FSDP."""
    return accelerator.num_processes if accelerator.distributed_type == DistributedType.FSDP else 1


def whole_model(accelerator: Accelerator, prepared):
    """The trained model, unwrapped, with whole parameters on every process.

    Under FSDP the prepared model holds only this process's shards; the evaluation, the saved
    folders and the next stage's conversion need whole weights, so they are gathered into a new
    model of the same class (every process calls this).
    """
    model = accelerator.unwrap_model(prepared)
    if accelerator.distributed_type != DistributedType.FSDP:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    whole_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    cls = type(model)
    if isinstance(model, FSDPModule):  # FSDP2 swaps the class for a subclass of (FSDPModule, the original)
        cls = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    whole = cls(model.config).to(device=accelerator.device, dtype=torch.float32)
    whole.load_state_dict(whole_state)
    return whole


def save_checkpoint(run_dir: Path, accelerator: Accelerator, student, optimizer, scheduler, state: dict) -> None:
    """Write ``run_dir/checkpoint`` atomically: a complete new one replaces the old one."""
    tmp = run_dir / ".checkpoint.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    model_state = accelerator.get_state_dict(student)  # whole tensors on the main process, also under FSDP
    optimizer_state = _optimizer_state(accelerator, student, optimizer)
    if accelerator.is_main_process:
        accelerator.unwrap_model(student).save_pretrained(tmp / "student", state_dict=model_state)
        torch.save(
            {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": _rng_state()},
            tmp / "trainer.pt",
        )
        write_json_atomic(tmp / "state.json", state)
        replace_directory(tmp, run_dir / "checkpoint")
    accelerator.wait_for_everyone()


# Beyond this many passes over the same tokens a run mostly memorises them. On the H200 a
# two-layer draft trained 12 M tokens over about 0.14 M unique ones (the defaults' 256 summaries
# and 1,024 short answers): KL 0.3 on its training rows, 2.5-3.4 on held-out text and answers.
MAX_DATA_PASSES = 4.0


def repetition_warning(total_steps: int, tokens_per_step: int, rows: int, seq_len: int) -> str | None:
    """A warning when a stage's planned tokens pass over its packed rows more than
    :data:`MAX_DATA_PASSES` times, naming the options that add data; None otherwise."""
    unique = rows * seq_len
    planned = total_steps * tokens_per_step
    passes = planned / max(unique, 1)
    if passes <= MAX_DATA_PASSES:
        return None
    return (
        f"this stage trains {planned:,} tokens over {unique:,} unique ones ({passes:.0f} passes), so the model "
        "will mostly memorise them: add data (built-in: --text-docs, --num-prompts, --label-tokens; or "
        "--data FILE) or train fewer tokens (--tokens, --time-budget-s)"
    )


def train_stage(
    cfg: DistillConfig,
    stage: Stage,
    student: HybridForCausalLM,
    teacher,
    docs: list[dict],
    run_dir: Path,
    accelerator: Accelerator,
    resume: dict | None,
    metrics_file,
    pad_id: int,
    stop_after_steps: int | None = None,
) -> HybridForCausalLM:
    """Train one stage; returns the unwrapped student. ``resume`` holds a checkpoint's state."""
    hp = cfg.stage_defaults()
    params = set_trainable(student, cfg.stage)
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    rows = D.pack_documents(docs, cfg.seq_len)
    world = accelerator.num_processes
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world
    total_steps = max(1, math.ceil(cfg.tokens / tokens_per_step))
    micro_needed = total_steps * cfg.grad_accum * world
    epochs = max(1, math.ceil(micro_needed * cfg.batch_size / max(1, len(rows))))

    optimizer = make_optimizer(params, hp["lr"], cfg)
    plan = {"total": total_steps}

    def warn_if_repeating() -> None:  # once the number of steps is known (after a budget's calibration)
        warning = repetition_warning(plan["total"] - start_step, tokens_per_step, len(rows), cfg.seq_len)
        if warning and accelerator.is_main_process:
            log.warning("stage %d: %s", stage.index, warning)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(plan, cfg.warmup, cfg.min_lr_ratio))
    start_step, tokens_seen = 0, 0
    calibrate = cfg.time_budget_s is not None
    if resume is not None:
        plan["total"] = total_steps = resume["total_steps"]
        calibrate = False
        trainer_state = torch.load(run_dir / "checkpoint" / "trainer.pt", weights_only=False)
        scheduler.load_state_dict(trainer_state["scheduler"])
        _set_rng_state(trainer_state["rng"])
        start_step, tokens_seen = resume["step"], resume["tokens_seen"]

    if not calibrate:
        warn_if_repeating()
    student, optimizer = accelerator.prepare(student, optimizer)
    # FSDP replaces the parameters with sharded ones: clip the gradients of those.
    params = [p for p in student.parameters() if p.requires_grad]
    if resume is not None:  # after prepare: under FSDP each process loads its own shards
        _load_optimizer_state(accelerator, student, optimizer, trainer_state["optimizer"])
    student.train()
    # The models as the steps call them: compiled with cfg.compile (the prepared student, so
    # that DDP still sees its forward), else themselves.
    student_call, teacher_call = (compiled(student), compiled(teacher)) if cfg.compile else (student, teacher)
    # Every process walks the same global order of micro-batches and takes its own share.
    batch_plan = D.batches(rows, cfg.batch_size, seed=cfg.seed + stage.index, start_step=start_step * cfg.grad_accum * world,
                     epochs=epochs, pad_id=pad_id)
    batch_iter = iter(batch_plan)

    bar = tqdm(total=total_steps, initial=start_step, desc=f"stage {stage.index} {stage.label}",
               disable=not (cfg.progress and accelerator.is_main_process), dynamic_ncols=True)
    t0, tokens_at_t0 = time.perf_counter(), tokens_seen
    t_second = t0  # start of the second step, which begins the speed measurement
    step = start_step
    while step < plan["total"]:
        if calibrate and step - start_step == 4:
            # Fit the schedule into the time budget, from the speed of steps 2-4 (step 1 warms up).
            per_step = (time.perf_counter() - t_second) / 3
            affordable = step + int((cfg.time_budget_s - (time.perf_counter() - t0)) / per_step)
            plan["total"] = max(step, min(plan["total"], affordable))
            bar.total = plan["total"]
            calibrate = False
            log.info("time budget %.0fs: %d steps at %.2fs/step", cfg.time_budget_s, plan["total"], per_step)
            warn_if_repeating()
            if step >= plan["total"]:  # the budget ends here: mark the stage done
                save_checkpoint(run_dir, accelerator, student, optimizer, scheduler,
                                {"stage": stage.index, "step": step, "tokens_seen": tokens_seen,
                                 "total_steps": plan["total"], "stage_done": True})
                break
        if step - start_step == 1:
            t_second = time.perf_counter()
        micro = [next(batch_iter) for _ in range(cfg.grad_accum * world)][accelerator.process_index :: world]
        local_tokens = sum(int(b["loss_mask"].sum()) for b in micro)
        scored = accelerator.reduce(torch.tensor(float(local_tokens), device=accelerator.device), "sum").item()
        divisor = max(scored, 1.0) / world  # DDP averages gradients over processes
        sums = {"loss": 0.0, "kl": 0.0, "ce": 0.0}
        for i, batch in enumerate(micro):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            sync = accelerator.no_sync(student) if i < len(micro) - 1 else nullcontext()
            with sync, accelerator.autocast():
                with torch.no_grad():
                    t_hidden = final_hidden(teacher_call, batch)
                s_hidden = final_hidden(student_call, batch)
                out = distill_loss_from_hidden(
                    s_hidden, accelerator.unwrap_model(student).lm_head, t_hidden, teacher.lm_head,
                    batch["input_ids"], batch["loss_mask"],
                    kl_weight=hp["kl_weight"], ce_weight=hp["ce_weight"], temperature=cfg.temperature,
                    reverse=cfg.reverse_kl, num_tokens=divisor,
                )
                accelerator.backward(out["loss"])
            n = out["n_tokens"]
            sums["loss"] += float(out["loss"].detach()) * divisor
            sums["kl"] += float(out["kl"]) * n
            sums["ce"] += float(out["ce"]) * n
        grad_norm = accelerator.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip else torch.tensor(0.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        tokens_seen += cfg.batch_size * cfg.seq_len * len(micro) * world
        elapsed = time.perf_counter() - t0
        # Log the step's loss over all processes' tokens, not just this one's share.
        totals = accelerator.reduce(
            torch.tensor([sums["loss"], sums["kl"], sums["ce"]], device=accelerator.device), "sum"
        ).tolist()
        n_scored = max(scored, 1.0)
        record = {
            "stage": stage.index, "step": step + 1, "tokens": tokens_seen,
            "loss": totals[0] / n_scored, "kl": totals[1] / n_scored, "ce": totals[2] / n_scored,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm), "tokens_per_s": (tokens_seen - tokens_at_t0) / max(elapsed, 1e-9),
        }
        if accelerator.is_main_process:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        bar.set_postfix(loss=f"{record['loss']:.3f}", kl=f"{record['kl']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        step += 1
        last = step >= plan["total"]
        if step % cfg.save_every == 0 or last:
            save_checkpoint(run_dir, accelerator, student, optimizer, scheduler,
                            {"stage": stage.index, "step": step, "tokens_seen": tokens_seen,
                             "total_steps": plan["total"], "stage_done": last})
        if stop_after_steps is not None and step - start_step >= stop_after_steps:
            raise RunInterrupted(f"stopped after step {step} (stop_after_steps={stop_after_steps})")
    bar.close()
    student = whole_model(accelerator, student)
    student.eval()
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_disable()
    for p in student.parameters():
        p.requires_grad_(False)
    return student


# ---------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------


def _precision(cfg: DistillConfig, device: torch.device) -> str:
    if cfg.precision == "auto":
        return "bf16" if device.type == "cuda" else "no"
    return {"bf16": "bf16", "fp32": "no"}[cfg.precision]


def make_accelerator(cfg: DistillConfig) -> Accelerator:
    """The run's ``Accelerator``: on the GPU when there is one (unless ``cfg.device`` is "cpu").

    Without a GPU it is made for the CPU even when the device is "auto": otherwise accelerate
    leaves processes started by ``torchrun`` / ``accelerate launch`` each on its own, every one
    of them the main process of a run of its own, and all of them writing the same run
    directory. A launch whose processes still do not see each other is refused.
    """
    on_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    accelerator = Accelerator(cpu=on_cpu, mixed_precision=_precision(cfg, torch.device("cpu" if on_cpu else "cuda")))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but accelerate joined "
            f"{accelerator.num_processes}; they would all write {cfg.out} at once. Launch with "
            "`torchrun --nproc_per_node N -m mambaify.cli ...` or `accelerate launch --num_processes N -m mambaify.cli ...`"
        )
    if (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and accelerator.is_main_process
            and accelerator.distributed_type != DistributedType.FSDP):
        log.warning("FSDP was asked for, but accelerate shards models only across GPUs: the %d %s processes run "
                    "plain data parallelism, each holding the whole model", launched, accelerator.device.type)
    if accelerator.device.type == "cuda":  # the scan and the float32 master weights use TF32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def _check_run_dir(run_dir: Path, cfg: DistillConfig, resume: bool) -> dict | None:
    """A run directory holds one run: refuse to mix two, and find where to resume."""
    saved_cfg = run_dir / "config.yaml"
    if resume:
        if not (run_dir / "checkpoint" / "state.json").is_file():
            if saved_cfg.is_file() or not run_dir.exists() or not any(run_dir.iterdir()):
                return None  # nothing trained yet: start (the cached data is reused)
            raise ValueError(f"--resume: {run_dir} holds no mambaify checkpoint")
        previous = yaml.safe_load(saved_cfg.read_text())
        ours = cfg.to_dict()
        # How the steps run (bars, checkpoints' spacing, compiled or not) may change on resume;
        # what they compute may not.
        changed = [k for k in ours if k not in ("progress", "out", "save_every", "compile")
                   and previous.get(k) != ours[k]]
        if changed:
            raise ValueError(
                f"--resume with different options than the run in {run_dir}: {', '.join(changed)}; "
                "resume with the same options, or start a new run with another --out"
            )
        return json.loads((run_dir / "checkpoint" / "state.json").read_text())
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ValueError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --out"
        )
    return None


def distill(cfg: DistillConfig, resume: bool = False, stop_after_steps: int | None = None) -> dict:
    """Run a whole distillation (all stages of the schedule); returns the final metrics.

    ``stop_after_steps`` aborts the run after that many optimizer steps, as a kill would
    (work after the last checkpoint is lost); tests use it to check ``resume``.
    """
    from ..eval.report import evaluate_pair, write_report
    from ..teachers import load_teacher

    cfg.validate()
    run_dir = Path(cfg.out)
    state = _check_run_dir(run_dir, cfg, resume)
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    teacher_dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
                     "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.teacher_dtype]
    teacher, tokenizer = load_teacher(cfg.teacher, dtype=teacher_dtype, device=str(device))
    for p in teacher.parameters():
        p.requires_grad_(False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    check_memory(cfg, teacher.config, device, bf16=accelerator.mixed_precision == "bf16",
                 shards=student_shards(accelerator))
    stages = plan_stages(teacher.config.num_hidden_layers, cfg.attention, cfg.schedule)
    if accelerator.is_main_process:  # the run directory is claimed only once the settings pass
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    accelerator.wait_for_everyone()
    run_data = prepare_data(cfg, teacher, tokenizer, run_dir, accelerator)

    metrics: dict[str, Any] = {"config": cfg.to_dict(), "stages": [], "device": str(device),
                               "processes": accelerator.num_processes}
    metrics_path = run_dir / "metrics.jsonl"
    first_stage = state["stage"] if state else 0
    student = None
    if state is not None:
        ckpt_student = run_dir / "checkpoint" / "student"
        student = HybridForCausalLM.from_pretrained(ckpt_student, dtype=torch.float32).to(device)
        if state.get("stage_done"):
            first_stage, state = first_stage + 1, None
        previous = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else None
        if previous:
            metrics["stages"] = previous.get("stages", [])[:first_stage]
            metrics["before"] = previous.get("before")
    with open(metrics_path, "a") as metrics_file:
        for stage in stages[first_stage:]:
            if state is None:  # a fresh stage: convert from the previous stage (or the teacher)
                source = student if student is not None else teacher
                student = convert(source, attention=stage.attn_layers, seed=cfg.seed + stage.index, init=cfg.init)
                student = student.to(device=device, dtype=torch.float32)  # float32 master weights
                if "before" not in metrics or metrics["before"] is None:
                    metrics["before"] = evaluate_pair(student, teacher, tokenizer, run_data, cfg, desc="before")
            t_start = time.perf_counter()
            student = train_stage(cfg, stage, student, teacher, run_data.train_docs, run_dir, accelerator,
                                  state, metrics_file, pad_id, stop_after_steps)
            state = None
            wall = time.perf_counter() - t_start
            if accelerator.is_main_process:
                stage_dir = run_dir / "stages" / f"{stage.index}-{stage.label}"
                tmp = stage_dir.with_name(stage_dir.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                student.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)  # a stage's model is usable on its own (generate, distill-draft)
                replace_directory(tmp, stage_dir)
            after = evaluate_pair(student, teacher, tokenizer, run_data, cfg, desc=f"after stage {stage.index}")
            metrics["stages"].append({"index": stage.index, "label": stage.label, "attn_layers": stage.attn_layers,
                                      "wall_s": wall, "after": after})
            if accelerator.is_main_process:
                write_json_atomic(run_dir / "metrics.json", metrics)

    if accelerator.is_main_process:
        final = run_dir / "model"
        tmp = run_dir / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_directory(tmp, final)
        metrics["after"] = metrics["stages"][-1]["after"]
        write_json_atomic(run_dir / "metrics.json", metrics)
        write_report(run_dir, metrics)
    accelerator.wait_for_everyone()
    return metrics


__all__ = ["DistillConfig", "distill", "train_stage", "set_trainable", "warmup_cosine"]
