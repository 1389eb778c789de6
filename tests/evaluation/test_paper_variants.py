"""The paper's comparison as the paper ran it: REAP on its own corpus next to generic REAP, protect-budget
sweeps with -B auto (held-out calibration windows only), and the report's labels and notes."""

from __future__ import annotations

import json
import sys

import datasets
import pytest

from moeprune import api
from moeprune.cli import experiment_options
from moeprune.data import sampling
from moeprune.data.corpora import load_documents, parse_corpus
from moeprune.errors import MoePruneError
from moeprune.evaluation import report
from moeprune.evaluation.perplexity import held_out_nll
from moeprune.experiment import run_experiment
from moeprune.planning import auto_budget
from moeprune.profiling.stats import Profile
from tests.grid_options import typed

from .test_experiment import grid_kwargs


@pytest.fixture(scope="module")
def sweep(tiny_checkpoint, text_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    kwargs = grid_kwargs(text_corpus, methods=["reap", "tb-coverage"], retains=(0.25, 0.5), seeds=(0,),
                         protect_budget=[0, 2, "auto"], reap_corpus=f"code={text_corpus}", reap_samples=4,
                         reap_seq_len=32)
    return out, run_experiment(str(tiny_checkpoint), out, **typed(kwargs))


def test_grid_runs_code_reap_next_to_generic_and_sweeps_b(sweep):
    out, result = sweep
    cells = {c["cell"]: c for c in result["cells"]}
    assert set(cells) == {"dense"} | {f"{v}-{r}" for r in ("0.25", "0.50") for v in (
        "reap", "reap@code", "tb-coverage@B0", "tb-coverage@B2", "tb-coverage@Bauto")}
    # REAP (code) ranks on the code corpus alone, profiled on its own so the generic methods never see it.
    code_prof = Profile.load(out / "profile-reap")
    assert code_prof.names == ["code"] and Profile.load(out / "profile").names == ["wiki", "web"]
    mask = json.loads((out / "masks" / "reap@code-0.50.json").read_text())
    assert mask["method"] == "reap" and mask["extra"]["score_corpus"] == "code"
    scores = code_prof.corpora["code"].reap_score()
    for layer, row in zip(code_prof.layer_ids, range(len(code_prof.layer_ids)), strict=True):
        best = sorted(range(8), key=lambda e, r=row: (-float(scores[r, e]), e))[:4]
        assert mask["layers"][str(layer)]["kept"] == sorted(best)
    text = (out / "report.md").read_text()
    assert "| REAP (generic) |" in text and "| REAP (code) |" in text and "TB-Coverage (B=auto)" in text
    assert "## Protect budget sensitivity" in text and (out / "plots" / "budget_ppl_notes.txt.png").is_file()


def test_sweep_records_clamp_and_auto(sweep):
    out, result = sweep
    cells = {c["cell"]: c for c in result["cells"]}
    clamped = cells["tb-coverage@B2-0.25"]["mask"]  # K=2: B=2 protects every kept expert
    assert clamped["candidate_used"] is False and "round-robin alone" in clamped["notes"][0]
    assert cells["tb-coverage@B2-0.50"]["mask"]["candidate_used"] is True
    auto = json.loads((out / "masks" / "tb-coverage@Bauto-0.50.json").read_text())
    record = auto["extra"]["auto_budget"]
    assert auto["protect_budget_requested"] == "auto" and set(record["tried"]) == {"0", "1", "2", "3", "4"}
    nll = {int(b): r["nll"] for b, r in record["tried"].items()}
    assert auto["protect_budget"] == record["chosen"] == min(nll, key=lambda b: (nll[b], b))
    assert set(record["held_out"]) == {"wiki", "web"}
    assert "†" in report.table1(result["cells"]) and "B used" in report.budget_table(result["cells"])


def test_auto_reads_only_held_out_train_windows(tiny_checkpoint, tmp_path, monkeypatch):
    prof = api.profile(str(tiny_checkpoint), ["wiki", "web"], tmp_path / "prof",
                       calibration={"samples": 4, "seq_len": 32, "batch_size": 2}, progress=False)
    read = []

    def spy(spec, *args, **kwargs):
        read.append(spec)
        return load_documents(spec, *args, **kwargs)

    def no_eval_text(*args, **kwargs):
        raise AssertionError("-B auto read evaluation text")

    monkeypatch.setattr(sampling, "load_documents", spy)
    # The package re-exports a function under the module's name: patch the module itself.
    monkeypatch.setattr(sys.modules["moeprune.evaluation.perplexity"], "load_eval_text", no_eval_text)
    (mask,) = api.plan_many(prof, "tb-coverage", [0.5], protect_budget="auto", candidate="reap",
                            model=str(tiny_checkpoint), progress=False)
    assert read and {(s.name, s.split) for s in read} == {("wiki", "train"), ("web", "train")}
    assert mask.protect_budget_requested == "auto" and mask.extra["auto_budget"]["held_out"] == {
        "wiki": [16, 32], "web": [16, 32]}
    # The held-out windows are the ones after the profile's calibration windows, not those windows again.
    tok = api.checked_tokenizer(None, api.checked_model(str(tiny_checkpoint), "auto", None, False), False)
    spec = parse_corpus("wiki")
    calibration = sampling.calibration_windows(spec, tok, 4, 32, 0)
    held = auto_budget.held_out_sets(prof, tok)["wiki"]
    assert held.tolist() == sampling.calibration_windows(spec, tok, 20, 32, 0)[4:].tolist()
    assert not set(map(tuple, held.tolist())) & set(map(tuple, calibration.tolist()))


def test_auto_refuses_a_profile_on_an_evaluation_split(tiny_checkpoint, tmp_path):
    prof = api.profile(str(tiny_checkpoint), ["wiki:test"], tmp_path / "prof",
                       calibration={"samples": 2, "seq_len": 32, "batch_size": 2}, progress=False)
    with pytest.raises(MoePruneError, match="evaluation data"):
        api.plan_many(prof, "tb-coverage", [0.5], protect_budget="auto", candidate="reap",
                      model=str(tiny_checkpoint), progress=False)


def test_paper_preset_runs_code_reap_and_cli_budgets(tiny_checkpoint):
    import argparse

    from moeprune.loading import ModelSource
    from moeprune.options import GridOptions

    base = dict(model=str(tiny_checkpoint), preset=None, out="x", dtype="auto", device=None, trust_remote_code=False)
    small = ModelSource.of(str(tiny_checkpoint))  # the paper preset (not the testbed), 128 positions
    paper = experiment_options(argparse.Namespace(**base, protect_budget=[20]))["grid"]
    assert paper.protect_budget == 20 and paper.budgets == [20]
    with pytest.raises(MoePruneError, match="--reap-seq-len 2048"):  # REAP's code windows beyond 128 positions
        paper.resolved(small)
    paper = GridOptions(protect_budget=20, reap_seq_len=64).resolved(small)
    assert paper.reap == "code=evol-codealpaca" and (paper.reap_samples, paper.reap_seq_len) == (128, 64)
    sweep = experiment_options(argparse.Namespace(**base, protect_budget=[0, 4, "auto"], reap_corpus="none"))["grid"]
    sweep = sweep.resolved(small)
    assert sweep.protect_budget == (0, 4, "auto") and sweep.budgets == [0, 4, "auto"] and sweep.reap is None
    bundled = experiment_options(argparse.Namespace(**{**base, "model": "bundled"}))["grid"]
    assert bundled.resolved(ModelSource.of("bundled")).reap is None


def test_code_corpus_offline_names_the_local_fallback(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(MoePruneError, match=r"code=/path/to/code\.jsonl:instruction\+output"):
        load_documents(parse_corpus("code=evol-codealpaca"))


def test_labels_and_old_cells():
    assert report.method_label("reap@code", ["reap", "reap@code"]) == "REAP (code)"
    assert report.method_label("reap", ["reap", "reap@code"]) == "REAP (generic)"
    assert report.method_label("reap", ["reap"]) == "REAP"
    assert report.method_label("tb-coverage@B8") == "TB-Coverage (B=8)"
    # A cell written before masks recorded candidate_used: B equal to K still marks it.
    old = {"cell": "tb-coverage-0.25", "method": "tb-coverage", "retain": 0.25, "kept_per_layer": 8,
           "mask": {"protect_budget": 8, "kept_per_layer": 8}, "summary": {"ppl": {"wiki": 3.0}}}
    assert report.candidate_unused(old) and "25% (K=8, B=8)" in report.clamp_note([old])


def test_auto_on_a_planned_expert_sparsity_candidate(tiny_checkpoint, tmp_path):
    # The experiment grid hands its planned expert-sparsity masks to plan_many (no second search).
    from moeprune.planning import plan
    from moeprune.planning.mask import ExpertMask

    prof = api.profile(str(tiny_checkpoint), ["wiki", "web"], tmp_path / "prof",
                       calibration={"samples": 4, "seq_len": 32, "batch_size": 2}, progress=False)
    reap = plan(prof, "reap", 0.5)
    candidate = ExpertMask.from_json({**reap.to_json(), "method": "expert-sparsity"})
    for layer in candidate.layers.values():
        layer.extra.update(reconstruction_loss=1.5, search="exact")
    model = api.checked_model(str(tiny_checkpoint), "auto", None, False)
    held_out = auto_budget.held_out_sets(prof, api.checked_tokenizer(None, model, False))
    [mask] = api.plan_many(prof, "tb-coverage", [0.5], protect_budget="auto", model=model,
                           candidate_masks={0.5: candidate}, progress=False)
    record = mask.extra["auto_budget"]
    assert mask.protect_budget_requested == "auto" and mask.protect_budget == record["chosen"]
    assert mask.candidate == "expert-sparsity" and set(record["tried"]) == {"0", "1", "2", "3", "4"}
    if mask.candidate_used:  # the candidate's loss is copied only when the candidate counted
        assert all(lm.extra["candidate_reconstruction_loss"] == 1.5 for lm in mask.layers.values())
    # B=0 is the candidate itself: its score is that of the candidate mask.
    b0 = held_out_nll(model, candidate, held_out)
    assert record["tried"]["0"]["nll"] == pytest.approx(sum(b0.values()) / 2)
