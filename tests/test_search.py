"""``kd-tasks search``: successive halving under a budget, the teacher-assistant rule, the Pareto students."""

import json

import pytest
import torch

from kd_tasks.search import Candidate, build_parser, family_members, pareto_students, run, successive_halving

torch.set_num_threads(1)


def fake(names_quality):
    """Candidates whose metric after e epochs is quality * (1 - 0.5 ** e); FLOPs grow with quality."""
    cands = [Candidate({"name": n}, flops=f) for n, (q, f) in names_quality.items()]
    quality = {n: q for n, (q, _) in names_quality.items()}
    calls = []

    def train(c, epochs):
        calls.append((c.member["name"], epochs))
        return quality[c.member["name"]] * (1 - 0.5 ** epochs), None

    return cands, train, calls


def test_halving_keeps_the_best_and_lengthens_the_schedule():
    cands, train, calls = fake({"a": (0.5, 1), "b": (0.7, 2), "c": (0.8, 4), "d": (0.9, 8)})
    final = successive_halving(cands, train, min_epochs=1, eta=2, log=lambda s: None)
    assert [c.member["name"] for c in final] == ["d"]
    assert calls == [("a", 1), ("b", 1), ("c", 1), ("d", 1), ("c", 2), ("d", 2), ("d", 4)]
    # the most accurate survives even when the score ranks it last
    cands, train, _ = fake({"a": (0.5, 1), "b": (0.7, 2), "c": (0.9, 8)})
    final = successive_halving(cands, train, min_epochs=1, score=lambda c: -c.flops, log=lambda s: None,
                               keep=lambda cs: [c is max(cs, key=lambda o: o.metric) for c in cs])
    assert "c" in [c.member["name"] for c in final]


def test_budget_stops_new_runs():
    cands, train, calls = fake({"a": (0.5, 1), "b": (0.7, 2)})
    final = successive_halving(cands, train, min_epochs=1, budget_s=0.0, log=lambda s: None)
    assert final == [] and calls == []


def test_pareto_students():
    cs = [Candidate({"name": n}, flops=f, runs=[{"metric": m}]) for n, f, m in
          (("small", 1, 0.8), ("mid", 2, 0.79), ("big", 4, 0.9))]
    assert [c.member["name"] for c in pareto_students(cs)] == ["small", "big"]


def test_family_grid():
    names = [m["name"] for m in family_members("cnn", [2, 4], [2, 3])]
    assert names == ["cnn:2-4", "cnn:4-8", "cnn:2-4-8", "cnn:4-8-16"]
    assert [m["width"] for m in family_members("mobilenet_v2", [0.25, 0.5], None)] == [0.25, 0.5]


def test_search_on_a_tiny_family_returns_its_best_member(tmp_path):
    args = build_parser().parse_args([
        "--dataset", "digits", "--teacher", "cnn:8", "--train-teacher-epochs", "3", "--widths", "1", "8",
        "--depths", "2", "--min-epochs", "1", "--budget", "300", "--output-dir", str(tmp_path)])
    result = run(args, log=lambda s: None)
    cands = {c["name"]: c for c in result["candidates"]}
    assert set(cands) == {"cnn:1-2", "cnn:8-16"}
    best = max(cands.values(), key=lambda c: (len(c["runs"]), c["runs"][-1]["metric"]))
    assert best["name"] == "cnn:8-16"  # eight times wider: clearly better on digits
    assert best["name"] in [p["name"] for p in result["pareto"]]
    longest = max(r["epochs"] for c in cands.values() for r in c["runs"])
    assert best["runs"][-1]["epochs"] == longest  # it was trained on the longest schedule of the search
    saved = json.loads((tmp_path / "search.json").read_text())
    assert saved["pareto"] == result["pareto"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["role"] for r in report["rows"]] == ["teacher"] + ["student"] * len(result["pareto"])
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
