"""benchmarks/feature_draft.py: the token-draft vs feature-draft experiment. Its acceptance
simulation against plain references (a Python loop; one forward per chain and depth), and the
script end to end on tiny random models."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def experiment():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("feature_draft", REPO / "benchmarks" / "feature_draft.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_accepted_run_counts_the_leading_matches_and_stops_off_the_targets_path(experiment):
    g = torch.Generator().manual_seed(0)
    matches = torch.rand(200, 5, generator=g) < 0.7
    on_path = torch.rand(200, 5, generator=g) < 0.8
    got = experiment.accepted_run(matches, on_path, 5)
    for row in range(200):
        for k in range(1, 6):
            accepted = 0
            for j in range(k):  # depth j + 1: accepted if it matches; the next depth needs the data on path
                if not matches[row, j]:
                    break
                accepted += 1
                if not on_path[row, j]:
                    break
            assert got[row, k - 1] == accepted, (row, k)
    assert experiment.accepted_run(torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool), 3).tolist() \
        == [[1, 2, 3]]


@pytest.fixture(scope="module")
def tiny_pair():
    import mambaify
    from mambaify.bench import build_teacher
    from mambaify.draft import build_draft_from_teacher

    teacher = build_teacher("tiny", torch.device("cpu"), torch.float32)
    target = mambaify.convert(teacher, attention=0.5).eval()
    return target, build_draft_from_teacher(teacher, layers=[-1], dtype=torch.float32)


def test_chain_proposals_equal_a_round_run_token_by_token(experiment, tiny_pair):
    """Each chain's depth-j proposal equals the draft run over exactly the tokens a round has:
    the committed prefix reading the target's features, then the chain's own outputs."""
    target, body = tiny_pair
    draft = experiment.FeatureDraft(body).eval()
    with torch.no_grad():
        draft.fc.weight.add_(0.05 * torch.randn(draft.fc.weight.shape, generator=torch.Generator().manual_seed(1)))
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, target.config.vocab_size, (1, 20), generator=g)
    mask = torch.ones_like(ids)
    features, _ = experiment.target_outputs(target, ids, mask)
    starts = torch.tensor([3, 9, 15])
    max_k = 4
    with torch.no_grad():
        got = experiment.chain_proposals(draft, ids, mask, features, starts, max_k)
    for chain, c in enumerate(starts.tolist()):
        reads = experiment.shifted(features)[:, : c + 1].clone()  # committed: the target's features
        for j in range(max_k):
            n = c + j + 1
            with torch.no_grad():
                hidden, logits = draft(ids[:, :n], reads[:, :n], mask[:, :n])
            assert got[chain, j] == logits[0, -1].argmax(), (c, j)
            reads = torch.cat([reads, hidden[:, -1:]], 1)  # depth j + 1 reads this depth's output
    # Depth 1 reads only the target's features: the teacher-forced prediction at the start.
    with torch.no_grad():
        _, forced = draft(ids, experiment.shifted(features), mask)
    assert torch.equal(got[:, 0], forced[0, starts].argmax(-1))


def test_feature_draft_loss_at_depth_one_is_kl_plus_the_feature_pull(experiment, tiny_pair):
    target, body = tiny_pair
    draft = experiment.FeatureDraft(body)
    ids = torch.randint(3, target.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[:, 4:11] = True
    features, logits = experiment.target_outputs(target, ids, mask)
    loss = experiment.feature_draft_loss(draft, ids, mask, answer, features, logits, depth=1, feature_weight=0.5)
    hidden, draft_logits = draft(ids, experiment.shifted(features), mask)
    p = torch.log_softmax(logits[answer].double(), -1)
    q = torch.log_softmax(draft_logits[answer].double(), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    pull = torch.nn.functional.smooth_l1_loss(hidden[answer].double(), features[answer].double())
    assert float(loss.detach()) == pytest.approx(float((kl + 0.5 * pull).detach()), rel=1e-4)
    # Two depths: the second reads the first's outputs, so the loss changes.
    deeper = experiment.feature_draft_loss(draft, ids, mask, answer, features, logits, depth=2, feature_weight=0.5)
    assert float(deeper.detach()) != pytest.approx(float(loss.detach()), rel=1e-6)


def test_script_runs_on_tiny_models(tmp_path):
    out = tmp_path / "fd"
    command = [sys.executable, str(REPO / "benchmarks" / "feature_draft.py"), "--tiny", "--out", str(out),
               "--train-prompts", "16", "--eval-prompts", "4", "--new-tokens", "12", "--steps", "4",
               "--batch-size", "4", "--max-k", "3", "--starts-per-row", "4", "--feature-layers", "0,-1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "feature_draft.json").read_text())
    assert set(data["drafts"]) == {"token", "feature"}
    for draft in data["drafts"].values():
        assert draft["steps"] == 4 and len(draft["losses"]) == 4
        assert 0.0 <= draft["top1_agreement"] <= 1.0 and draft["rounds"] == 4 * 4
        accepted = [draft["mean_accepted"][str(k)] for k in (1, 2, 3)]
        assert all(0.0 <= a <= k for a, k in zip(accepted, (1, 2, 3))) and accepted == sorted(accepted)
    assert "| feature | 2 | 4 |" in (out / "feature_draft.md").read_text() and data["drafts"]["token"]["layers"] == 2
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "feature_draft.py"), "--out", str(out)],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 2 and "--target" in result.stderr
