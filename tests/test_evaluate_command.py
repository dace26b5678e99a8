"""`cliplab evaluate`: the robustness report card of a loadable classifier: a Markdown table on stdout, an atomic
JSON with the settings, versions and seed, and clear errors, before any work, for bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cliplab
from cliplab.cli import main

NOTEBOOK_CHECKPOINTS = Path(__file__).resolve().parents[1] / "notebooks" / "encoders" / "shapes"
FAST = ["--steps", "3", "--targets", "2", "--queries", "5", "--quiet"]


def test_report_card_of_the_shapes_model(tmp_path, capsys):
    code = main(["evaluate", "--n", "40", "--eps", "2/255,4/255", *FAST, "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| eps 2/255 |" in printed and "| eps 4/255 |" in printed and "worst case" in printed
    assert "n=40" in printed
    document = json.loads((tmp_path / "evaluation.json").read_text())
    assert document["settings"]["n"] == 40 and document["settings"]["seed"] == 0
    assert document["settings"]["threat"]["budget"]["steps"] == 3
    assert set(document["versions"]) >= {"cliplab", "torch", "open_clip", "python"}
    for result, first in zip(document["results"], ([], ["smaller radii"])):  # 4/255 attacks 2/255's survivors
        assert list(result["per_attack"]) == [*first, "apgd-ce", "apgd-t", "square"]
        assert result["robust"] == result["per_attack"]["square"]
        assert result["robust"]["hits"] <= result["clean"]["hits"] and result["clean"]["n"] == 40
        low, high = result["robust"]["ci95"]
        assert low <= result["robust"]["value"] <= high
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "evaluation.json"], "temporary files left behind"


def test_report_card_of_a_fine_tuned_checkpoint_matches_the_library(tmp_path, capsys):
    """A checkpoint file (what `cliplab finetune` writes) loads through --pretrained; the numbers are those of
    evaluate_robustness called directly with the same settings."""
    torch.manual_seed(0)
    weights = tmp_path / "final.safetensors"
    cliplab.save_weights(cliplab.load_classifier("shapes", device="cpu").model, weights)
    code = main(["evaluate", "--model", "shapes", "--pretrained", str(weights), "--n", "24", "--eps", "4/255",
                     "--attacks", "pgd,apgd-ce", *FAST, "--out", str(tmp_path / "out")])
    assert code == 0
    result = json.loads((tmp_path / "out" / "evaluation.json").read_text())["results"][0]
    x, y, _ = cliplab.load_dataset("shapes", n=24)
    expected = cliplab.evaluate_robustness(cliplab.load_classifier("shapes", pretrained=str(weights), device="cpu"),
                                           x, y, eps=4 / 255, attacks=["pgd", "apgd-ce"], progress=False,
                                           budget=cliplab.AttackBudget(steps=3, num_targets=2, queries=5))
    assert result["robust"]["hits"] == expected.robust.hits
    hits = {name: p["hits"] for name, p in result["per_attack"].items()}
    assert hits == {name: p.hits for name, p in expected.per_attack.items()}


@pytest.mark.slow  # one short evaluation per committed encoder
def test_every_adapters_merged_encoder_loads_through_the_command_line(capsys):
    """06's encoders hold every adapter (full, OFT, LoRA, the last block, BitFit) merged into plain weights: each
    loads with --encoder."""
    encoders = sorted(NOTEBOOK_CHECKPOINTS.glob("*.safetensors"))
    adapters = {json.loads(p.with_suffix(".json").read_text())["config"]["adapter"] for p in encoders}
    assert adapters == {"full", "oft", "lora", "last-k", "bitfit"}
    for encoder in encoders:
        assert main(["evaluate", "--encoder", str(encoder), "--n", "4", "--eps", "4/255", "--attacks", "apgd-ce",
                     *FAST]) == 0, encoder.name
        assert "| eps 4/255 |" in capsys.readouterr().out


def test_report_card_of_a_cached_encoder(tmp_path, capsys):
    """The notebooks' fine-tuned encoders (the image encoder alone) load with --encoder; a file holding anything else
    is refused before any work."""
    from cliplab.study import load_encoder

    encoder = NOTEBOOK_CHECKPOINTS / "fare-full.safetensors"
    assert main(["evaluate", "--encoder", str(encoder), "--n", "24", "--eps", "4/255", "--attacks", "apgd-ce",
                     *FAST, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "evaluation.json").read_text())["results"][0]
    x, y, _ = cliplab.load_dataset("shapes", n=24)
    model = load_encoder(cliplab.load_classifier("shapes", device="cpu"), encoder)
    expected = cliplab.evaluate_robustness(model, x, y, eps=4 / 255, attacks=["apgd-ce"], progress=False,
                                           budget=cliplab.AttackBudget(steps=3, num_targets=2, queries=5))
    assert (result["clean"]["hits"], result["robust"]["hits"]) == (expected.clean.hits, expected.robust.hits)

    whole_model = tmp_path / "whole.safetensors"
    cliplab.save_weights(cliplab.load_classifier("shapes", device="cpu").model, whole_model)
    assert main(["evaluate", "--encoder", str(whole_model), "--out", str(tmp_path / "out")]) == 2
    assert "does not hold this model's image encoder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--attacks", "autoattack"], "argument --attacks: must be one of standard, rand, pgd"),
    (["--attacks", "apgd-ce,fab"], "unknown: fab"),
    (["--eps", "2"], "argument --eps: must be in [0, 1]"),
    (["--eps", "-1/255"], "argument --eps: must be in [0, 1]"),
    (["--eps", "0"], "argument --eps: expected one or more radii in (0, 1]"),
])
def test_bad_arguments_are_usage_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", *argv, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--n", "10001"], "n must be at most 10000, the size of the shapes test split"),
    (["--n", "0"], "--n must be >= 1"),
    (["--targets", "0"], "--targets must be >= 1"),
    (["--targets", "100"], "budget.num_targets must be at most the number of classes - 1 (99)"),
    (["--model", "ViT-B-32"], "pretrained must be given for model 'ViT-B-32'"),
    (["--pretrained", "missing.safetensors"], "missing.safetensors"),
    (["--encoder", "missing.safetensors"], "encoder: no such file"),
])
def test_bad_settings_fail_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", *argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "nothing may be written for bad input"


def test_the_attack_plan_is_checked_before_any_model_like_the_librarys():
    """report.check and evaluate_robustness share one check of the attacks against the budget: targets count only
    where APGD-T runs, Square refuses L2, and a bad budget field is named, all before any model is built."""
    from cliplab.study import report
    from cliplab.evaluation import ThreatModel, check_attack_plan

    many_targets = cliplab.AttackBudget(num_targets=150)
    threat = ThreatModel((4 / 255,), attacks=("apgd-ce", "square"), budget=many_targets)
    report.check(report.ReportSettings(threat=threat))  # no APGD-T: fine
    with pytest.raises(ValueError, match=r"num_targets must be at most .* \(99\)"):
        report.check(report.ReportSettings(threat=ThreatModel((4 / 255,), attacks="standard", budget=many_targets)))
    with pytest.raises(ValueError, match="square is an L-inf attack"):
        check_attack_plan(("apgd-ce", "square"), "l2", cliplab.AttackBudget(), 10)
    with pytest.raises(ValueError, match="budget.queries must be >= 1"):
        check_attack_plan("standard", "linf", cliplab.AttackBudget(queries=0), 10)
    assert check_attack_plan("rand", "l2", cliplab.AttackBudget(), 10) == ["apgd-ce", "apgd-dlr"]


def test_a_second_evaluation_into_the_same_out_is_refused_before_any_model_loads(tmp_path, held_lock, capsys,
                                                                                 monkeypatch):
    """Two evaluations into one --out: the second is refused at once, naming the first (both used to run, and the
    last to finish silently replaced the other's evaluation.json)."""
    from cliplab.study import report

    monkeypatch.setattr(report, "evaluate", lambda *args, **kwargs: pytest.fail("the evaluation ran"))
    with held_lock(tmp_path / "eval", "evaluation") as pid:
        assert main(["evaluate", "--n", "4", "--out", str(tmp_path / "eval")]) == 2
    assert f"is in use by another evaluation (pid {pid})" in capsys.readouterr().err
