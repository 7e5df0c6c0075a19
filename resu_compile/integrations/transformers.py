"""RESU training under the HF ``Trainer``: ``Trainer(..., callbacks=[ResuCallback(sparsity=0.7)])``.

The callback does what a hand-written loop does with ``resu.compile``, at the points where the
``Trainer`` lets it:

- ``on_train_begin`` compiles the model in place (``resu.compile(model, inplace=True)``), so its
  ``forward`` signature (read by ``remove_unused_columns``) and its ``state_dict`` keys (no
  ``_orig_mod.``) stay its own; ``total_steps`` defaults to the Trainer's ``max_steps``, so the
  schedule fits the run. It then attaches to the real optimizer: the Trainer hands callbacks
  accelerate's ``AcceleratedOptimizer``, a ``torch.optim.Optimizer`` subclass that never ran its
  base ``__init__`` (no step hooks), around the optimizer that really steps.
- ``on_save`` writes ``resu_state.pt`` into ``checkpoint-N/``. Mid-RESU the pruned slots of the
  live managed weights hold theta; the checkpoint's weight files are then written again from
  ``export()`` (pruned weights exactly zero, so ``from_pretrained(checkpoint)`` gives the sparse
  model), and the live values go into ``resu_state.pt``. Re-saving at ``on_save`` rather than
  overriding ``Trainer._save`` keeps the callback usable with any ``Trainer`` subclass.
- At a resumed ``on_train_begin`` (``global_step > 0``) it loads ``resu_state.pt`` and puts theta
  back, so the schedule continues where it stopped; model, optimizer and RNG state come from the
  Trainer as usual. Callbacks are not told which checkpoint the Trainer resumed from, so the
  callback reads ``output_dir/checkpoint-<global_step>`` (what ``resume_from_checkpoint=True``
  and paths inside ``output_dir`` give) or ``ResuCallback(resume_from=...)``, and checks, by a
  digest of every managed weight, that the state belongs to the weights the Trainer loaded.
- ``on_train_end`` warns when the Trainer took steps but the schedule never moved (the run stayed
  dense), and when training stops inside a RESU phase (``trainer.save_model()`` would write theta).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from typing import Any

import torch

try:
    import safetensors.torch
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as error:
    raise ImportError(
        "resu_compile.integrations.transformers needs transformers and accelerate: "
        "pip install 'resu-compile[hf]'"
    ) from error

import resu_compile as resu
from resu_compile import Phase, PhaseController, ResuConfig

RESU_STATE_NAME = "resu_state.pt"
RESU_STATE_FORMAT = 1

__all__ = ["RESU_STATE_NAME", "ResuCallback"]


class ResuCallback(TrainerCallback):
    """Trains the Trainer's model with RESU: compile, optimizer hook, checkpoints, resume.

    ``sparsity`` and ``options`` are :class:`ResuConfig` fields, validated here, so a bad option
    fails before the Trainer is built. Without ``total_steps`` or ``steps_per_cycle`` the schedule
    spans the Trainer's ``max_steps``. Leave them all out to use a model already compiled by
    ``resu.compile(model, ..., inplace=True)``. ``resume_from``: the checkpoint directory the
    Trainer resumes from, needed only when it is not ``output_dir/checkpoint-<step>``.
    """

    def __init__(
        self,
        sparsity: float | None = None,
        *,
        resume_from: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> None:
        if sparsity is not None:
            options["sparsity"] = sparsity
        ResuConfig.from_options(options)
        self._options = options
        self._resume_from = None if resume_from is None else os.fspath(resume_from)
        self._controller: PhaseController | None = None
        self._start: tuple[int, int, int] = (0, 0, 0)

    # -- events -----------------------------------------------------------------------------

    def on_init_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Refuse what cannot work as soon as the Trainer exists (no model yet with model_init)."""
        _check_arguments(args)
        if model is not None:
            self._check_model(model)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        _check_arguments(args)
        if model is None:
            raise ValueError("ResuCallback: the Trainer passed no model to on_train_begin")
        controller = self._check_model(model)
        if controller is None:
            options = self._schedule_options(state.max_steps)
            controller = resu.compile(model, inplace=True, **options).resu
        if controller.config.run_steps > state.max_steps:
            warnings.warn(
                f"ResuCallback: the RESU schedule spans {controller.config.run_steps} optimizer "
                f"steps but the Trainer runs {state.max_steps}, so training stops inside it; leave "
                "total_steps / steps_per_cycle out to fit the schedule to the run",
                stacklevel=2,
            )
        if state.global_step > 0:
            self._resume(args, state, model, controller)
        elif self._resume_from is not None:
            raise ValueError(
                "ResuCallback: resume_from is set but the Trainer is not resuming; pass "
                "resume_from_checkpoint to trainer.train()"
            )
        controller.detach()  # a previous train() call, or the user's own attach()
        controller.attach(_real_optimizer(optimizer))
        self._controller = controller
        self._start = (state.global_step, controller.step_count, controller.paused_steps)

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if not args.should_save:
            return
        controller = self._require_controller("on_save")
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(checkpoint):
            raise RuntimeError(
                f"ResuCallback: the Trainer's checkpoint directory {checkpoint} does not exist "
                "(hyper-parameter search runs keep checkpoints elsewhere and are not supported)"
            )
        exported = controller.export(model)
        live = model.state_dict()
        theta = {
            name: live[name].detach().cpu().clone()
            for name, value in exported.items()
            if not torch.equal(value, live[name].detach().cpu())
        }
        if theta:
            _save_weights(model, checkpoint, exported)
        torch.save(
            {
                "format": RESU_STATE_FORMAT,
                "global_step": state.global_step,
                "controller": controller.state_dict(),
                "theta": theta,
                "digests": {name: _digest(exported[name]) for name in controller.masks()},
            },
            os.path.join(checkpoint, RESU_STATE_NAME),
        )

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        controller = self._require_controller("on_train_end")
        global_step, step_count, paused_steps = self._start
        moved = controller.step_count - step_count + controller.paused_steps - paused_steps
        if state.global_step > global_step and moved == 0:
            warnings.warn(
                f"ResuCallback: the Trainer took {state.global_step - global_step} optimizer "
                f"steps but the RESU schedule never moved (phase {controller.phase.value}, step "
                f"{controller.step_count}): the hooked optimizer {type(controller.optimizer).__name__}"
                " never stepped, so the model trained dense",
                stacklevel=2,
            )
        if controller.phase is Phase.RESU:
            warnings.warn(
                "ResuCallback: training ended inside a RESU phase: the pruned slots of the model's "
                "managed weights hold theta, and trainer.save_model() saves them as they are; "
                "save model.resu.export() for the sparse model",
                stacklevel=2,
            )
        controller.detach()

    # -- helpers ----------------------------------------------------------------------------

    def _schedule_options(self, max_steps: int) -> dict[str, Any]:
        options = dict(self._options)
        if "total_steps" not in options and "steps_per_cycle" not in options:
            options["total_steps"] = max_steps
        return options

    def _check_model(self, model: torch.nn.Module) -> PhaseController | None:
        """The model's controller when ``resu.compile(..., inplace=True)`` made it, else None."""
        if hasattr(model, "_orig_mod"):
            raise ValueError(
                "ResuCallback: the Trainer got a torch.compile wrapper (its forward signature and "
                "'_orig_mod.' keys break column selection and checkpoints); pass the model itself "
                "(ResuCallback compiles it in place) or resu.compile(model, inplace=True)"
            )
        try:
            controller = resu.controller(model)
        except ValueError:
            controller = None
        if controller is None and getattr(model, "_compiled_call_impl", None) is not None:
            raise ValueError(
                "ResuCallback: the model is already compiled (model.compile(...)); pass it "
                "uncompiled: ResuCallback compiles it with resu.compile(model, inplace=True)"
            )
        if controller is not None and controller is not self._controller and self._options:
            raise ValueError(
                "ResuCallback: the model is already compiled by resu.compile, with its own "
                f"options; pass options {sorted(self._options)} there or here, not both"
            )
        return controller

    def _require_controller(self, event: str) -> PhaseController:
        if self._controller is None:
            raise RuntimeError(f"ResuCallback: {event} before on_train_begin compiled the model")
        return self._controller

    def _resume(
        self,
        args: TrainingArguments,
        state: TrainerState,
        model: torch.nn.Module,
        controller: PhaseController,
    ) -> None:
        """Restore the schedule and theta saved by :meth:`on_save` in the resumed checkpoint."""
        checkpoint = self._resume_from or os.path.join(
            args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        )
        path = os.path.join(checkpoint, RESU_STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"ResuCallback: the Trainer resumes at global step {state.global_step} but {path} "
                "does not exist; for a checkpoint outside output_dir pass "
                "ResuCallback(resume_from=CHECKPOINT_DIR)"
            )
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("format") != RESU_STATE_FORMAT:
            raise ValueError(f"ResuCallback: {path} is not a resu_state of format 1")
        if saved["global_step"] != state.global_step:
            raise ValueError(
                f"ResuCallback: {path} was saved at global step {saved['global_step']}, the "
                f"Trainer resumes at {state.global_step}; pass resume_from=the checkpoint it "
                "resumes from"
            )
        for name, digest in saved["digests"].items():
            if _digest(model.get_parameter(name)) != digest:
                raise ValueError(
                    f"ResuCallback: weight {name!r} loaded by the Trainer is not the one saved "
                    f"with {path}: the Trainer resumed from another checkpoint; pass "
                    "resume_from=the checkpoint it resumes from"
                )
        controller.load_state_dict(saved["controller"])
        with torch.no_grad():
            for name, value in saved["theta"].items():
                model.get_parameter(name).copy_(value)


def _check_arguments(args: TrainingArguments) -> None:
    if args.torch_compile:
        raise ValueError(
            "ResuCallback: TrainingArguments(torch_compile=True) (or torch_compile_backend / "
            "torch_compile_mode) compiles the model a second time; leave them unset: ResuCallback "
            "compiles the model with the resu backend itself"
        )
    if args.deepspeed or args.fsdp:
        raise ValueError(
            "ResuCallback: DeepSpeed and FSDP shard the managed weights and wrap the optimizer; "
            "they are not supported"
        )


def _real_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The optimizer that really steps, under accelerate's (possibly nested) wrappers."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            "ResuCallback: the Trainer's optimizer must wrap a torch.optim.Optimizer, got "
            f"{type(optimizer).__name__}"
        )
    return optimizer


def _save_weights(model: torch.nn.Module, directory: str, state_dict: dict[str, Any]) -> None:
    """Write ``state_dict`` as the model's weight files the way ``Trainer._save`` does."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory, state_dict=dict(state_dict))  # it removes entries
    else:
        safetensors.torch.save_file(
            state_dict, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"}
        )


def _digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes: tells which checkpoint a loaded weight came from, exactly."""
    data = tensor.detach().cpu().contiguous().view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()
