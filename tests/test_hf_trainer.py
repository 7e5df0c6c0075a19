"""``ResuCallback`` under the HF ``Trainer`` (CPU, tiny GPT-2): the schedule runs to its target
through the real optimizer, columns survive ``remove_unused_columns``, a checkpoint saved mid-RESU
loads with ``from_pretrained`` with pruned weights exactly zero, and resuming from it continues the
uninterrupted run bit for bit."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

import resu_compile as resu  # noqa: E402
from resu_compile.integrations.transformers import RESU_STATE_NAME, ResuCallback  # noqa: E402
from tests.invariants import assert_exact_counts  # noqa: E402

GPT2Config = transformers.GPT2Config
GPT2LMHeadModel = transformers.GPT2LMHeadModel
Trainer = transformers.Trainer
TrainerCallback = transformers.TrainerCallback
TrainingArguments = transformers.TrainingArguments

# One cycle of 10 steps: TRAIN 6, STABILIZE 1, RESU 3 (steps 8-10), commit at step 10.
STEPS, SAVE_AT = 10, 8
OPTIONS = {"sparsity": 0.5, "cycles": 1, "compiler": "aot_eager", "theta_init_eps": 0.5}


class _Tokens(torch.utils.data.Dataset):
    """Random token rows, plus a column the model does not take (removed by the Trainer)."""

    def __init__(self, rows: int = 64, length: int = 16) -> None:
        self.ids = torch.randint(0, 64, (rows, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "labels": self.ids[i], "source": torch.tensor(i)}


class _AtSave(TrainerCallback):
    """Records, at each save, the masks and whether theta sits in the live pruned slots."""

    def __init__(self) -> None:
        self.saves: dict[int, dict[str, Any]] = {}

    def on_save(self, args, state, control, model=None, **kwargs) -> None:
        controller = resu.controller(model)
        masks = {name: mask.clone() for name, mask in controller.masks().items()}
        theta = any(bool(model.get_parameter(n)[~m].ne(0).any()) for n, m in masks.items())
        self.saves[state.global_step] = {"phase": controller.phase, "masks": masks, "theta": theta}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0
    )
    config.eos_token_id = 0
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    return GPT2LMHeadModel(config)


def _args(output_dir: Path, **overrides: Any) -> TrainingArguments:
    settings = {
        "max_steps": STEPS,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-2,
        "save_steps": SAVE_AT,
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "logging_steps": 100,
        **overrides,
    }
    return TrainingArguments(str(output_dir), **settings)


def _trainer(model, output_dir: Path, callbacks: list, **overrides: Any) -> Trainer:
    return Trainer(
        model=model,
        args=_args(output_dir, **overrides),
        train_dataset=_Tokens(),
        callbacks=callbacks,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Any]:
    """One uninterrupted run, with a checkpoint at step 8 (inside the RESU phase)."""
    torch._dynamo.reset()
    output_dir = tmp_path_factory.mktemp("hf") / "run"
    model, recorder = _model(), _AtSave()
    trainer = _trainer(model, output_dir, [ResuCallback(**OPTIONS), recorder])
    keys = list(model.state_dict())
    trainer.train()
    controller = resu.controller(model)
    return {
        "dir": output_dir,
        "trainer": trainer,
        "model": model,
        "keys": keys,
        "saves": recorder.saves,
        "masks": {name: mask.clone() for name, mask in controller.masks().items()},
        "weights": {name: value.clone() for name, value in model.state_dict().items()},
        "history": list(controller.history),
    }


def test_schedule_reaches_the_target_through_the_real_optimizer(run) -> None:
    trainer, model = run["trainer"], run["model"]
    controller = model.resu
    assert trainer.args.remove_unused_columns  # the default: columns found by forward's signature
    assert controller.phase is resu.Phase.DONE
    assert controller.step_count == STEPS == trainer.state.global_step
    assert type(controller.optimizer) is torch.optim.AdamW
    assert controller.optimizer is trainer.optimizer.optimizer  # under AcceleratedOptimizer
    assert len(run["masks"]) == 4  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    assert_exact_counts(controller, 0.5)
    for name, mask in run["masks"].items():
        assert torch.equal(model.get_parameter(name) != 0, mask), name
    assert list(model.state_dict()) == run["keys"]  # compiled in place: no "_orig_mod." prefix
    assert [e["event"] for e in run["history"]] == ["prune", "resu", "commit"]


def test_mid_resu_checkpoint_loads_sparse_with_from_pretrained(run) -> None:
    save = run["saves"][SAVE_AT]
    assert save["phase"] is resu.Phase.RESU and save["theta"]  # the live weights hold theta
    checkpoint = run["dir"] / f"checkpoint-{SAVE_AT}"
    loaded = GPT2LMHeadModel.from_pretrained(checkpoint)
    for name, mask in save["masks"].items():
        assert torch.equal(loaded.get_parameter(name) != 0, mask), name
    state = torch.load(checkpoint / RESU_STATE_NAME, weights_only=True)
    assert state["global_step"] == SAVE_AT
    assert state["controller"]["phase"] == "resu"
    assert sorted(state["theta"]) == sorted(save["masks"])


def test_resume_mid_resu_continues_the_uninterrupted_run(run, tmp_path) -> None:
    output_dir = tmp_path / "resumed"
    checkpoint = run["dir"] / f"checkpoint-{SAVE_AT}"
    shutil.copytree(checkpoint, output_dir / checkpoint.name)
    model = _model()
    trainer = _trainer(model, output_dir, [ResuCallback(**OPTIONS)])
    trainer.train(resume_from_checkpoint=True)
    controller = resu.controller(model)
    assert controller.step_count == STEPS and controller.phase is resu.Phase.DONE
    assert controller.history == run["history"]
    masks = controller.masks()
    assert masks.keys() == run["masks"].keys()
    for name, mask in run["masks"].items():
        assert torch.equal(masks[name], mask), name
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, run["weights"][name], rtol=0, atol=0, msg=name)


def test_resume_refuses_a_state_that_is_not_the_checkpoints(run, tmp_path) -> None:
    checkpoint = run["dir"] / f"checkpoint-{SAVE_AT}"
    elsewhere = tmp_path / "elsewhere" / checkpoint.name
    shutil.copytree(checkpoint, elsewhere)
    model = _model()
    trainer = _trainer(model, tmp_path / "out", [ResuCallback(**OPTIONS)])
    with pytest.raises(FileNotFoundError, match="resume_from"):
        trainer.train(resume_from_checkpoint=str(elsewhere))
    # The resu state of step 8 given for untrained weights: the digests tell them apart.
    _model().save_pretrained(elsewhere)
    trainer = _trainer(
        _model(), tmp_path / "out", [ResuCallback(resume_from=checkpoint, **OPTIONS)]
    )
    with pytest.raises(ValueError, match=r"c_attn\.weight"):
        trainer.train(resume_from_checkpoint=str(elsewhere))


def test_a_precompiled_model_is_reused_with_gradient_accumulation(tmp_path) -> None:
    model = _model()
    options = {**OPTIONS, "compiler": "eager", "total_steps": STEPS}
    controller = resu.compile(model, inplace=True, **options).resu
    trainer = _trainer(
        model,
        tmp_path,
        [ResuCallback()],
        max_steps=SAVE_AT,
        save_strategy="no",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
    )
    with pytest.warns(UserWarning) as caught:
        trainer.train()
    messages = [str(w.message) for w in caught]
    assert any("spans 10 optimizer steps but the Trainer runs 8" in m for m in messages)
    assert any("ended inside a RESU phase" in m for m in messages)
    assert resu.controller(model) is controller
    assert controller.step_count == SAVE_AT == trainer.state.global_step  # once per update
    assert controller.phase is resu.Phase.RESU


class _Detach(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        resu.controller(model).detach()


def test_warns_when_the_schedule_never_moves(tmp_path) -> None:
    trainer = _trainer(
        _model(),
        tmp_path,
        [ResuCallback(**{**OPTIONS, "compiler": "eager"}), _Detach()],
        max_steps=2,
        save_strategy="no",
    )
    with pytest.warns(UserWarning, match="trained dense"):
        trainer.train()


def test_refuses_what_cannot_work(tmp_path) -> None:
    with pytest.raises(ValueError, match="'sparsity'"):
        ResuCallback(sparsity=1.5)
    with pytest.raises(ValueError, match="torch_compile"):
        _trainer(_model(), tmp_path, [ResuCallback(**OPTIONS)], torch_compile=True)
    with pytest.raises(ValueError, match=r"torch\.compile wrapper"):
        _trainer(torch.compile(_model()), tmp_path, [ResuCallback(**OPTIONS)])
    model = resu.compile(_model(), inplace=True, **OPTIONS)
    with pytest.raises(ValueError, match="not both"):
        _trainer(model, tmp_path, [ResuCallback(**OPTIONS)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = _model()
        compiled.compile(backend="eager")
    with pytest.raises(ValueError, match="already compiled"):
        _trainer(compiled, tmp_path, [ResuCallback(**OPTIONS)])
