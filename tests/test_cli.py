"""The console script end to end on a tiny local checkpoint: profile -> plan -> apply -> inspect, and its errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from moeprune.cli import main
from moeprune.planning.mask import ExpertMask
from moeprune.surgery import masked

CALIBRATION = ["--samples", "4", "--seq-len", "32", "--batch-size", "2"]


@pytest.fixture(scope="module")
def profiled(tiny_checkpoint, text_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prof")
    code = main(
        [
            "profile",
            str(tiny_checkpoint),
            "--corpus",
            "wiki",
            "--corpus",
            f"notes={text_corpus}",
            *CALIBRATION,
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out


def test_profile_writes_one_file_per_corpus(profiled):
    names = sorted(p.name for p in profiled.iterdir())
    assert names == ["notes.json", "notes.safetensors", "wiki.json", "wiki.safetensors"]
    meta = json.loads((profiled / "wiki.json").read_text())
    assert meta["tokens"] == 4 * 32 and meta["seq_len"] == 32 and meta["top_k"] == 2
    assert meta["corpus"]["kind"] == "bundled" and "torch" in meta["versions"]


def test_plan_apply_round_trip(profiled, tiny_checkpoint, tmp_path, capsys):
    masks = tmp_path / "masks"
    assert (
        main(
            [
                "plan",
                str(profiled),
                "--method",
                "tb-coverage",
                "--candidate",
                "reap",
                "--retain",
                "0.5",
                "0.75",
                "--out",
                str(masks),
            ]
        )
        == 0
    )
    files = sorted(p.name for p in masks.iterdir())
    assert files == ["tb-coverage-0.50.json", "tb-coverage-0.75.json"]
    mask = ExpertMask.load(masks / "tb-coverage-0.50.json")
    assert mask.kept_per_layer == 4 and all(len(m.kept) == 4 for m in mask.layers.values())

    out = tmp_path / "pruned"
    assert main(["apply", str(tiny_checkpoint), str(masks / "tb-coverage-0.50.json"), "--out", str(out)]) == 0
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert pruned.config.num_experts == 4
    dense = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    ids = torch.randint(5, 4000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), masked(dense, mask):
        expected = dense(ids).logits
    with torch.no_grad():
        got = pruned(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (out / "mask.json").exists() and (out / "README.md").exists() and (out / "tokenizer.json").exists()

    capsys.readouterr()
    assert main(["inspect", str(masks / "tb-coverage-0.50.json")]) == 0
    assert "keeps 4 of 8 experts" in capsys.readouterr().out
    assert main(["inspect", str(profiled)]) == 0
    assert "corpus wiki" in capsys.readouterr().out
    assert main(["inspect", str(tiny_checkpoint)]) == 0
    assert "8 routed per layer, top-2" in capsys.readouterr().out


def test_rerun_skips_finished_corpora(profiled, tiny_checkpoint, capsys):
    before = (profiled / "wiki.safetensors").stat().st_mtime_ns
    assert main(["profile", str(tiny_checkpoint), "--corpus", "wiki", *CALIBRATION, "--out", str(profiled)]) == 0
    assert (profiled / "wiki.safetensors").stat().st_mtime_ns == before
    assert "already profiled" in capsys.readouterr().out


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_errors_name_the_problem_and_the_fix(profiled, tiny_checkpoint, tmp_path, capsys):
    assert "fewer than the router's top-k=2" in _error(
        capsys, ["plan", str(profiled), "--method", "reap", "--retain", "0.125", "--out", str(tmp_path)]
    )
    assert "outside (0, 1]" in _error(
        capsys, ["plan", str(profiled), "--method", "reap", "--retain", "1.5", "--out", str(tmp_path)]
    )
    assert "Unknown planning method 'nope'" in _error(
        capsys, ["plan", str(profiled), "--method", "nope", "--retain", "0.5", "--out", str(tmp_path)]
    )
    missing = _error(
        capsys,
        ["profile", str(tiny_checkpoint), "--corpus", str(tmp_path / "absent.txt"), "--out", str(tmp_path / "p")],
    )
    assert "absent.txt not found" in missing
    assert "not found; create one" in _error(
        capsys, ["apply", str(tiny_checkpoint), str(tmp_path / "m.json"), "--out", str(tmp_path / "o")]
    )


def test_non_moe_model_is_refused(tmp_path, capsys, tokenizer):
    dense = AutoModelForCausalLM.from_config(
        Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    dense.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    err = _error(
        capsys, ["profile", str(tmp_path / "dense"), "--corpus", "wiki", *CALIBRATION, "--out", str(tmp_path / "p")]
    )
    assert "not a supported MoE" in err and "qwen2" in err


def test_mask_for_another_model_is_refused(profiled, tmp_path, capsys, tokenizer):
    from tests.tiny_models import build_model, save_model

    other = tmp_path / "other"
    save_model(build_model("qwen2_moe", num_experts=16, vocab_size=len(tokenizer)), other)
    tokenizer.save_pretrained(other)
    main(["plan", str(profiled), "--method", "frequency", "--retain", "0.5", "--out", str(tmp_path / "m")])
    err = _error(
        capsys, ["apply", str(other), str(tmp_path / "m" / "frequency-0.50.json"), "--out", str(tmp_path / "o")]
    )
    assert "8 experts per layer" in err and "has 16" in err


def test_profile_from_another_model_is_refused(profiled, tmp_path, capsys, tokenizer):
    from tests.tiny_models import build_model, save_model

    other = tmp_path / "other"
    save_model(build_model("qwen2_moe", seed=1, vocab_size=len(tokenizer)), other)
    tokenizer.save_pretrained(other)
    # Same shape, different architecture settings: its config hash differs from the profiled model's.
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    err = _error(
        capsys,
        [
            "plan",
            str(profiled),
            "--method",
            "expert-sparsity",
            "--retain",
            "0.5",
            "--model",
            str(other),
            "--recon-samples",
            "2",
            "--recon-seq-len",
            "16",
            "--out",
            str(tmp_path / "m"),
        ],
    )
    assert "The profile was made from" in err and "config hash" in err


def test_recon_tokens_budget_and_loss_flags(profiled, tiny_checkpoint, tmp_path):
    import shutil

    prof = shutil.copytree(profiled, tmp_path / "prof")
    args = ["plan", str(prof), "--method", "expert-sparsity", "--retain", "0.5", "--model", str(tiny_checkpoint),
            "--recon-samples", "4", "--recon-seq-len", "16", "--recon-loss", "global", "--out", str(tmp_path / "m")]
    assert main([*args, "--recon-tokens", "40"]) == 0
    (capture,) = (prof / "reconstruction").iterdir()
    meta = json.loads((capture / "meta.json").read_text())
    assert meta["tokens"] == 32 and meta["samples"] == 2  # two whole windows of 16 fit in 40 tokens
    assert ExpertMask.load(tmp_path / "m" / "expert-sparsity-0.50.json").kept_per_layer == 4


def test_expert_sparsity_refuses_a_routing_rule_that_is_not_the_models(profiled, tiny_checkpoint, tmp_path, capsys,
                                                                        monkeypatch):
    import dataclasses

    from moeprune.arch import adapters

    # The tiny Qwen1.5-MoE keeps its top-k softmax weights unnormalised; a row claiming renormalisation is wrong.
    wrong = dataclasses.replace(adapters.ARCHITECTURES["qwen2_moe"], routing="softmax_topk_renorm")
    monkeypatch.setitem(adapters.ARCHITECTURES, "qwen2_moe", wrong)
    err = _error(capsys, ["plan", str(profiled), "--method", "expert-sparsity", "--retain", "0.5",
                          "--model", str(tiny_checkpoint), "--recon-samples", "2", "--recon-seq-len", "16",
                          "--out", str(tmp_path / "m")])
    assert "expert-sparsity cannot re-route qwen2_moe's router exactly" in err
    assert "plan with another method, or TB-Coverage with --candidate reap" in err
    assert "Traceback" not in err and not (tmp_path / "m").exists()


def test_ppl_windows_reaches_the_evaluation(capsys):
    """--ppl-windows N scores the first N windows (eval and experiment), and refuses N < 1 before any work."""
    from moeprune.cli import build_parser, experiment_options

    args = build_parser().parse_args(["experiment", "bundled", "--ppl-windows", "7", "--out", "x"])
    assert experiment_options(args)["evaluation"].max_windows == 7
    plain = build_parser().parse_args(["experiment", "bundled", "--out", "x"])
    assert experiment_options(plain)["evaluation"].max_windows is None
    assert main(["eval", "bundled", "--ppl-windows", "0"]) == 2
    assert "--ppl-windows must be at least 1" in capsys.readouterr().err
