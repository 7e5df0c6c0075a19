"""The accuracy benchmark, CPU-sized: its planning, training, traces, resuming and tasks.

The real-data check runs ``benchmarks/accuracy.py``'s own planning, training, evaluation and
summary on real Fashion-MNIST (from $RESU_DATA or ../shared/data) with a smaller MLP
(784-256-256-10) and 1000 steps of batch 128 (about 20 s on one core). The other tests use a
separable synthetic image set (no data needed), tiny variants of the new tasks' models, and the
State of the Union text when present.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import resu_compile as resu
from benchmarks import accuracy, accuracy_tasks
from benchmarks.accuracy_tasks import TASKS, TextData
from resu_examples import datasets
from resu_examples.datasets import ImageData
from tests.conftest import REPO_ROOT, SHARED_FASHION_MNIST

SPARSITY = 0.9
TASK = dataclasses.replace(
    TASKS["fmnist-mlp"], model_args={"hidden": (256, 256)}, steps=1000, batch_size=128
)
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def _fashion_mnist() -> Path:
    try:
        found = datasets.find_fashion_mnist(
            os.environ.get(datasets.DATA_ENV_VAR) or SHARED_FASHION_MNIST
        )
    except FileNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST not found ($RESU_DATA or ../shared/data/fashion-mnist): {exc}")
    if found is None:
        pytest.skip("Fashion-MNIST not found ($RESU_DATA or ../shared/data/fashion-mnist)")
    return found


def _sotu_dir() -> Path:
    try:
        return accuracy_tasks.find_sotu(os.environ.get(datasets.DATA_ENV_VAR) or SHARED_DATA).parent
    except FileNotFoundError as exc:
        pytest.skip(f"State of the Union text not found: {exc}")


def test_resu_resurrects_and_beats_pruning_without_recovery_on_held_out_data() -> None:
    data_dir = _fashion_mnist()
    runs = accuracy.plan(TASK, ["dense", "resu-random"], [SPARSITY], seeds=[0])
    records = accuracy.execute(
        runs, device="cpu", compiler="aot_eager", data_dir=str(data_dir), threads=1, log=print
    )
    errors = [r["error"] for r in records if "error" in r]
    assert not errors, "\n".join(errors)
    assert all(r["steps"] == TASK.steps for r in records)

    rows = {row["method"]: row for row in accuracy.summarize(TASK, records, [SPARSITY])}
    resu, no_recovery = rows["resu-random"], rows[accuracy.NO_RECOVERY]
    assert resu["resurrected_mean"] > 0, resu
    assert resu["actual_sparsity_mean"] == pytest.approx(SPARSITY, abs=1e-3), resu
    assert rows["dense"]["actual_sparsity_mean"] == 0.0
    # Held-out (test-set) accuracy in percent: RESU, trained at the same sparsity, against the
    # trained dense model pruned to it by magnitude with no further training.
    assert resu["mean"] > no_recovery["mean"], (resu, no_recovery)


# --------------------------------------------------------------------------------------------------
# Synthetic images: two blobs per class, linearly separable, so a few steps learn something
# --------------------------------------------------------------------------------------------------


def _synthetic_images(data_dir: Any, device: torch.device) -> ImageData:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 64, generator=generator) * 2

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(4, (n,), generator=generator)
        return centres[labels] + torch.randn(n, 64, generator=generator), labels

    train_x, train_y = split(512)
    test_x, test_y = split(256)
    return ImageData("synthetic", train_x, train_y, test_x, test_y, 4, (8, 8))


SYNTHETIC = dataclasses.replace(
    TASKS["fmnist-mlp"],
    name="synthetic-mlp",
    model_args={"hidden": (32,), "inputs": 64, "classes": 4},
    steps=50,
    batch_size=32,
    load=_synthetic_images,
    trace_limit=10_000,  # the whole test split: trace points and final metrics agree exactly
)


def _execute(runs: list[accuracy.Run], **extra: Any) -> list[dict[str, Any]]:
    records = accuracy.execute(runs, device="cpu", compiler="aot_eager", threads=1, **extra)
    errors = [r["error"] for r in records if "error" in r]
    assert not errors, "\n".join(errors)
    return records


def test_trace_has_a_point_after_every_transition_and_the_value_before_the_final_prune():
    fast_rigl = (("method", "rigl"), ("rigl_interval", 10))
    resu_run = accuracy.Run(SYNTHETIC, "resu", 0.8, 0)
    rigl_run = accuracy.Run(SYNTHETIC, "rigl-fast", 0.8, 0, options=fast_rigl)
    resu_record, rigl_record = _execute([resu_run, rigl_run])

    for record in (resu_record, rigl_record):
        trace = record["trace"]
        assert trace[0] == {"step": 0, "metric": trace[0]["metric"], "event": "start"}
        assert trace[-1]["step"] == SYNTHETIC.steps
        # Trace and final metric read the same (whole) test split here.
        assert trace[-1]["metric"] == pytest.approx(record["metric"])
        by_step = {point["step"]: point["event"] for point in trace}
        for event in record["transitions"]:
            # A transition runs inside step(): seen right after that step (RigL's initial mask,
            # recorded at step 0, is seen after the first step).
            assert event["event"] in by_step[max(event["step"], 1)].split("+"), (event, by_step)
        periodic = [p["step"] for p in trace if p["event"] == "every"]
        assert all(step % record["trace_every"] == 0 for step in periodic)
        assert 20 <= len(trace) <= 60

    kinds = {event["event"] for event in resu_record["transitions"]}
    assert kinds == {"prune", "resu", "commit"}
    assert "rigl" in {event["event"] for event in rigl_record["transitions"]}
    # 5 cycles of 8 steps (80% of 50): the last prune ends step 4 * 8 + 5, the value before it
    # is taken after step 36 and is also a trace point.
    prunes = [e["step"] for e in resu_record["transitions"] if e["event"] == "prune"]
    assert prunes[-1] == accuracy.final_prune_step(resu_record["options"]) == 37
    before = resu_record["before_final_prune"]
    assert before["step"] == 36 and resu_record["before_final_prune_error"] is None
    assert {"step": 36, "metric": before["metric"], "event": "before-final-prune"} in (
        resu_record["trace"]
    )
    assert rigl_record["before_final_prune"] is None  # RigL's one prune is its random init


def test_summary_checks_the_final_metric_against_the_value_before_the_final_prune():
    def record(seed: int, metric: float, before: float) -> dict[str, Any]:
        return {
            "method": "resu",
            "sparsity": 0.9,
            "seed": seed,
            "metric": metric,
            "before_final_prune": {"step": 10, "metric": before},
            "resurrected": 0,
            "resurrected_trained": 0,
            "actual_sparsity": 0.9,
            "seconds": 1.0,
        }

    # Accuracy: seeds end at 80 and 82 (std 1.41); one run lost 1 point since before its final
    # prune (within the spread), then one that lost 3 (beyond it).
    within = accuracy.summarize(SYNTHETIC, [record(0, 80, 81), record(1, 82, 80)], [0.9])
    assert within[0]["recovers"] is True and within[0]["worse_than_before_max"] == 1
    beyond = accuracy.summarize(SYNTHETIC, [record(0, 80, 83), record(1, 82, 80)], [0.9])
    assert beyond[0]["recovers"] is False
    assert "resu s=0.9" in accuracy.recovery_verdict(beyond)
    # Perplexity: lower is better, so a rise is the loss.
    text_task = TASKS["kjv-gpt"]
    rows = accuracy.summarize(text_task, [record(0, 4.0, 3.0), record(1, 4.1, 4.2)], [0.9])
    assert rows[0]["worse_than_before_max"] == pytest.approx(1.0) and not rows[0]["recovers"]


# --------------------------------------------------------------------------------------------------
# Recovery tasks: one checkpoint per seed, every method starts from it
# --------------------------------------------------------------------------------------------------


def test_recovery_runs_start_from_one_cached_checkpoint(tmp_path):
    task = dataclasses.replace(SYNTHETIC, name="synthetic-recover", steps=20, pretrain_steps=30)
    pre = accuracy.Run(task, accuracy.PRETRAIN, None, 0)
    runs = accuracy.plan(task, ["dense", "oneshot"], [0.8], [0])
    pretrained, dense, oneshot = _execute([pre, *runs], cache_dir=tmp_path)
    assert pretrained["method"] == accuracy.PRETRAIN and not pretrained["cached"]
    assert pretrained["steps"] == 30
    assert Path(pretrained["checkpoint"]) == accuracy.checkpoint_path(task, 0, tmp_path)
    # Both runs start from the checkpoint: their first trace point is its metric.
    for record in (dense, oneshot):
        assert record["trace"][0]["metric"] == pytest.approx(pretrained["metric"])
    # One-shot prunes before the first step, so the value before its final prune is the
    # checkpoint's; pruned-no-recovery prunes the checkpoint, not dense's recovered weights.
    assert [e["step"] for e in oneshot["transitions"]] == [0]
    assert oneshot["before_final_prune"] == {"step": 0, "metric": pretrained["metric"]}
    state = torch.load(pretrained["checkpoint"], weights_only=True)["model"]
    model = task.model()
    model.load_state_dict(state)
    data = _synthetic_images(None, torch.device("cpu"))
    names = [name for name, p in model.named_parameters() if p.dim() == 2]
    expected = accuracy.pruned_without_recovery(
        model, names, 0.8, lambda: task.evaluate(model, data, None)
    )
    assert dense["no_recovery"]["0.8"] == pytest.approx(expected)
    # A second worker (a new process) finds the checkpoint instead of training again.
    again = _execute([pre], cache_dir=tmp_path)[0]
    assert again["cached"] and again["metric"] == pretrained["metric"]


# --------------------------------------------------------------------------------------------------
# Command line: variants, resuming
# --------------------------------------------------------------------------------------------------


def test_variant_parser_reads_json_values_and_validates_options():
    name, options = accuracy.parse_variant(
        'resu-dense-head:schedule=cubic,exclude=["lm.lm_head.weight","*.0.*"],theta_lr=1e-4'
    )
    assert name == "resu-dense-head"
    assert options == {
        "method": "resu",
        "schedule": "cubic",
        "exclude": ["lm.lm_head.weight", "*.0.*"],
        "theta_lr": 1e-4,
    }
    assert accuracy.parse_variant("gmp-linear:method=gmp,schedule=linear")[1] == {
        "method": "gmp",
        "schedule": "linear",
    }
    for bad, word in [
        ("no-colon", "NAME:KEY=VALUE"),
        ("x:theta_lr", "KEY=VALUE"),
        ("x:no_such_option=1", "no_such_option"),
        ("x:theta_lr=-1", "theta_lr"),
        ("resu:amnesty=false", "already a method"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=word):
            accuracy.parse_variant(bad)
    run = accuracy.plan(SYNTHETIC, [], [0.9], [0], {name: options})[0]
    compiled = accuracy.compile_options(run, "aot_eager")
    assert compiled["schedule"] == "cubic" and compiled["total_steps"] == 40


def test_resume_keeps_finished_runs_and_plans_the_rest():
    runs = accuracy.plan(SYNTHETIC, ["dense", "resu", "gmp"], [0.7, 0.9], [0, 1])

    def record(run: accuracy.Run, **extra: Any) -> dict[str, Any]:
        options = json.loads(json.dumps(accuracy.compile_options(run, "aot_eager")))
        base = {"method": run.method, "sparsity": run.sparsity, "seed": run.seed}
        config = accuracy.resolved_config(options)
        return {**base, "options": options, "config": config, "metric": 1.0, **extra}

    def find(method: str, sparsity: float | None, seed: int) -> accuracy.Run:
        return next(r for r in runs if (r.method, r.sparsity, r.seed) == (method, sparsity, seed))

    dense0, resu0 = find("dense", None, 0), find("resu", 0.7, 0)
    stale = {**record(find("gmp", 0.7, 0))}
    stale["config"] = {**stale["config"], "cycles": 2}
    earlier = [
        record(dense0, no_recovery={"0.7": 1.0, "0.9": 1.0}),
        record(resu0),
        stale,  # the same run under other options: superseded, trained again
        {**record(find("gmp", 0.9, 0)), "error": "boom"},  # failed: trained again
        record(find("dense", None, 1), no_recovery={"0.7": 1.0}),  # lacks 0.9: trained again
        {"method": "resu-frozen", "sparsity": 0.9, "seed": 0, "metric": 2.0},  # not planned
    ]
    resumed = accuracy.remaining(SYNTHETIC, runs, earlier, "aot_eager")
    assert resumed.kept == [earlier[0], earlier[1], earlier[5]]
    assert resumed.todo == [r for r in runs if r not in (dense0, resu0)]
    assert not resumed.relabelled and not resumed.stale
    assert accuracy.remaining(SYNTHETIC, runs, [], "aot_eager").todo == runs
    # The same label and options under another library default is another run.
    moved = {**earlier[1], "config": {**earlier[1]["config"], "distribution": "uniform"}}
    assert resu0 in accuracy.remaining(SYNTHETIC, runs, [moved], "aot_eager").todo


def test_resume_matches_runs_by_what_they_compute_not_by_label():
    """After a default moves, the variant that spelled out the new default serves the default's
    label, and a built-in label's records from before the move are dropped, not mislabelled."""
    name, spelled = accuracy.parse_variant("resu-r30:r_start=0.3")
    variant = accuracy.plan(SYNTHETIC, [], [0.9], [0], {name: spelled})[0]
    options = json.loads(json.dumps(accuracy.compile_options(variant, "aot_eager")))
    record = {
        "method": "resu-r30",
        "sparsity": 0.9,
        "seed": 0,
        "options": options,
        "config": accuracy.resolved_config(options),
        "metric": 1.0,
    }
    # As if the library's default r_start had moved to 0.3: "resu" now resolves to the variant.
    (default,) = accuracy.plan(SYNTHETIC, ["resu"], [0.9], [0])
    moved = dataclasses.replace(default, options=tuple(spelled.items()))
    resumed = accuracy.remaining(SYNTHETIC, [moved], [record], "aot_eager")
    assert resumed.todo == [] and resumed.relabelled == [("resu-r30", "resu")]
    (kept,) = resumed.kept
    assert kept["method"] == "resu" and kept["metric"] == 1.0
    assert kept["options"] == json.loads(json.dumps(accuracy.compile_options(moved, "aot_eager")))
    assert kept["relabelled_from"] == {"method": "resu-r30", "options": options}
    # Today's "resu" is another run: the record does not serve it, and stays under its own label.
    resumed = accuracy.remaining(SYNTHETIC, [default], [record], "aot_eager")
    assert resumed.todo == [default] and resumed.kept == [record]
    # A built-in label, not planned now, whose record resolves otherwise than the label today.
    stale = {**record, "method": "resu-no-amnesty"}
    resumed = accuracy.remaining(SYNTHETIC, [], [stale], "aot_eager")
    assert resumed.kept == [] and resumed.stale == ["resu-no-amnesty"]


def test_main_resumes_from_its_partial_result(tmp_path, monkeypatch):
    out = tmp_path / "accuracy-synthetic-mlp.json"
    task = dataclasses.replace(SYNTHETIC, steps=20)
    monkeypatch.setitem(accuracy.TASKS, task.name, task)
    args = ["--task", task.name, "--seeds", "0", "--sparsities", "0.8", "--out", str(out)]
    assert accuracy.main([*args, "--methods", "dense", "--cache", str(tmp_path)]) == 0
    first = json.loads(out.read_text())
    assert [r["method"] for r in first["runs"]] == ["dense"] and not first["partial"]
    assert first["torch"] and first["date"] and first["device"] == "cpu"
    assert accuracy.main([*args, "--methods", "dense,oneshot", "--resume"]) == 0
    second = json.loads(out.read_text())
    assert [r["method"] for r in second["runs"]] == ["dense", "oneshot"]
    assert second["runs"][0] == first["runs"][0]  # kept as it was, not trained again
    assert len(second["commands"]) == 2


def test_estimate_uses_earlier_seconds_per_method_else_the_task_step_time():
    runs = accuracy.plan(SYNTHETIC, ["dense", "resu"], [0.7, 0.9], [0, 1, 2])
    seconds, source = accuracy.estimate_seconds(SYNTHETIC, runs, 3, None)
    assert seconds == pytest.approx(len(runs) * SYNTHETIC.steps * SYNTHETIC.step_ms / 1e3 / 3)
    assert "step_ms" in source
    earlier = {
        "steps": SYNTHETIC.steps,
        "device": "GPU",
        "runs": [{"method": "dense", "seconds": 10.0}, {"method": "resu", "seconds": 20.0}],
    }
    seconds, source = accuracy.estimate_seconds(SYNTHETIC, runs, 3, earlier)
    assert seconds == pytest.approx((3 * 10.0 + 6 * 20.0) / 3) and "GPU" in source


# --------------------------------------------------------------------------------------------------
# The new tasks' models and data
# --------------------------------------------------------------------------------------------------


def test_sotu_split_is_chronological_without_header_lines():
    addresses = [f"=== {1790 + i}_someone_n\nAddress {i}.\n".encode() for i in range(20)]
    train, val = accuracy_tasks.sotu_split(b"".join(addresses))
    assert b"===" not in train + val
    assert val == b"Address 18.\nAddress 19.\n"  # the last 10% of 20 addresses
    assert train.startswith(b"Address 0.\n") and train.endswith(b"Address 17.\n")


def test_sotu_llama_learns_bytes_in_a_few_steps():
    data_dir = _sotu_dir()
    task = dataclasses.replace(
        TASKS["sotu-llama"],
        model_args={"layers": 2, "hidden": 64, "intermediate": 128, "heads": 4},
        steps=10,
        batch_size=4,
        trace_limit=4,
    )
    data = task.load(data_dir, torch.device("cpu"))
    assert len(data.val) > 0.05 * len(data.train)
    model = task.model()
    # Untied output head, the Llama blocks' projections; the embedding is not a matmul weight.
    assert model.lm.lm_head.weight is not model.lm.model.embed_tokens.weight
    record = accuracy.train_run(
        accuracy.Run(task, "resu-2", 0.9, 0, options=(("method", "resu"), ("cycles", 2))),
        data,
        torch.device("cpu"),
        "aot_eager",
        max_eval=8,
    )
    assert record["actual_sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert (
        record["managed_weights"]
        == sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight"))
        + model.lm.lm_head.weight.numel()
    )
    # Bits per byte below 8 (a uniform guess over 256 bytes): the 10 steps learned something.
    assert math.isfinite(record["metric"]) and record["metric"] < 8.0
    assert record["trace"][0]["metric"] > record["trace"][-1]["metric"]


def test_text_metrics_agree():
    # Four validation windows of 256 bytes; every byte of window i is i.
    val = (torch.arange(1025) // 256).to(torch.uint8)
    data = TextData(torch.zeros(1000, dtype=torch.uint8), val)

    class Uniform(torch.nn.Module):
        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*idx.shape, 256)

    assert accuracy_tasks.validation_bits_per_byte(Uniform(), data) == pytest.approx(8.0)
    assert accuracy_tasks.validation_perplexity(Uniform(), data) == pytest.approx(256.0, rel=1e-5)
    assert len(accuracy_tasks.validation_windows(data)) == 4
    spread = accuracy_tasks.validation_windows(data, limit=2)
    assert spread[:, 0].tolist() == [0, 3]  # the first and the last window


def test_cnn_task_prunes_its_convolutions():
    task = dataclasses.replace(TASKS["fmnist-cnn"], model_args={"channels": (4, 8)})
    torch.manual_seed(0)
    model = task.model()
    images = torch.randn(3, 784)
    assert model(images).shape == (3, 10)
    compiled = resu.compile(model, sparsity=0.5, total_steps=10, compiler="aot_eager")
    compiled(images)
    convs = [n for n, p in model.named_parameters() if p.dim() == 4]
    managed = set(compiled.resu.masks())
    if not managed & set(convs):
        pytest.skip("convolutions not managed by this build")
    data = ImageData(
        "synthetic28",
        torch.randn(256, 784),
        torch.randint(10, (256,)),
        torch.randn(64, 784),
        torch.randint(10, (64,)),
        10,
        (28, 28),
    )
    record = accuracy.train_run(
        accuracy.Run(dataclasses.replace(task, steps=20, batch_size=32), "gmp", 0.5, 0),
        data,
        torch.device("cpu"),
        "aot_eager",
    )
    assert record["managed_weights"] == sum(
        p.numel() for n, p in model.named_parameters() if n in managed
    )
    assert record["actual_sparsity"] == pytest.approx(0.5, abs=1e-3)


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def test_plot_draws_one_panel_per_sparsity(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import accuracy_plot

    def run(method: str, sparsity: float | None, seed: int) -> dict[str, Any]:
        trace = [
            {"step": 0, "metric": 10.0, "event": "start"},
            {"step": 5, "metric": 50.0 + seed, "event": "prune"},
            {"step": 10, "metric": 60.0 + seed, "event": "commit+prune"},
        ]
        return {"method": method, "sparsity": sparsity, "seed": seed, "trace": trace}

    runs = [run("dense", None, s) for s in (0, 1)]
    runs += [run("resu", sp, s) for sp in (0.7, 0.9) for s in (0, 1)]
    result = {
        "task": "t",
        "metric": "accuracy",
        "higher_is_better": True,
        "steps": 10,
        "runs": runs,
        "summary": [{"method": accuracy.NO_RECOVERY, "sparsity": 0.9, "mean": 20.0}],
    }
    assert accuracy_plot.mean_trace(runs[:2]) == [
        (0, 10.0, "start"),
        (5, 50.5, "prune"),
        (10, 60.5, "commit+prune"),
    ]
    path = accuracy_plot.plot_result(result, tmp_path / "figure.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
