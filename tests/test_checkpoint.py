"""State survives save and load: a run resumed from a checkpoint continues bit for bit."""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Callable

import pytest
import torch

import resu_compile as resu
from resu_compile.kernels.bits import unpack_bits
from tests.invariants import assert_run_unchanged, snapshot_run
from tests.zoo import ZOO_BY_NAME

OPTIONS = {"sparsity": 0.6, "cycles": 2, "steps_per_cycle": 10, "compiler": "aot_eager"}


def _build(theta_optimizer: str, seed_offset: int = 0):
    entry = ZOO_BY_NAME["mlp"]
    model = entry.build()
    if seed_offset:
        with torch.no_grad():
            for param in model.parameters():
                param.add_(float(seed_offset))  # a different starting point, overwritten by load
    compiled = resu.compile(model, theta_optimizer=theta_optimizer, **OPTIONS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    return entry, model, compiled, optimizer


def _train(entry, compiled, optimizer, steps: range) -> None:
    for step in steps:
        loss = entry.loss_fn(compiled(*entry.make_batch(step)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        compiled.resu.step(optimizer)


def _roundtrip(obj: object) -> object:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("theta_optimizer", ["sgd", "adamw"])
# Every phase boundary of cycle 0 (prune after step 6, RESU entry after 7, commit after 10), a
# mid-RESU step, and a mid-TRAIN step of cycle 1.
@pytest.mark.parametrize("save_at", [6, 7, 8, 10, 16])
def test_resume_from_checkpoint_is_bit_identical(theta_optimizer: str, save_at: int) -> None:
    entry, model, compiled, optimizer = _build(theta_optimizer)
    _train(entry, compiled, optimizer, range(save_at))
    if save_at == 8:
        assert compiled.resu.phase is resu.Phase.RESU
    checkpoint = _roundtrip(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "resu": compiled.resu.state_dict(),
        }
    )
    _train(entry, compiled, optimizer, range(save_at, 20))

    torch._dynamo.reset()
    _, fresh_model, fresh, fresh_optimizer = _build(theta_optimizer, seed_offset=1)
    fresh_model.load_state_dict(checkpoint["model"])
    fresh_optimizer.load_state_dict(checkpoint["optimizer"])
    fresh.resu.load_state_dict(checkpoint["resu"])
    _train(entry, fresh, fresh_optimizer, range(save_at, 20))

    for (name, expected), (_, got) in zip(
        model.named_parameters(), fresh_model.named_parameters(), strict=True
    ):
        assert torch.equal(got, expected), name
    assert fresh.resu.masks().keys() == compiled.resu.masks().keys()
    for name, mask in compiled.resu.masks().items():
        assert torch.equal(fresh.resu.masks()[name], mask)
    assert fresh.resu.history == compiled.resu.history
    assert fresh.resu.phase is resu.Phase.DONE


def test_loading_a_checkpoint_of_another_method_fails_and_changes_nothing() -> None:
    entry, _, compiled, optimizer = _build("sgd")
    _train(entry, compiled, optimizer, range(8))
    state = compiled.resu.state_dict()
    torch._dynamo.reset()
    entry = ZOO_BY_NAME["mlp"]
    other = resu.compile(
        entry.build(), sparsity=0.5, cycles=2, steps_per_cycle=10, compiler="aot_eager"
    )
    other(*entry.make_batch(0))
    with pytest.raises(ValueError, match="option 'sparsity' differs"):
        other.resu.load_state_dict(state)
    assert other.resu.phase is resu.Phase.TRAIN and other.resu.step_count == 0
    assert all(mask is None for mask in other.resu.masks().values())


def test_a_checkpoint_from_before_an_option_existed_loads_as_the_old_behaviour() -> None:
    """theta_lr_schedule came later: a state without it ran theta at a constant rate, so it
    loads into a model that asks for that and is refused, with the fix named, by the default."""
    entry, _, compiled, optimizer = _build("sgd")
    _train(entry, compiled, optimizer, range(8))
    state = compiled.resu.state_dict()
    weights = {k: v.clone() for k, v in compiled.state_dict().items()}
    del state["config"]["theta_lr_schedule"]
    for schedule, loads in (("constant", True), ("optimizer", False)):
        torch._dynamo.reset()
        model = entry.build()
        options = {**OPTIONS, "theta_optimizer": "sgd", "theta_lr_schedule": schedule}
        other = resu.compile(model, **options)
        other(*entry.make_batch(0))
        other.load_state_dict(weights)
        if loads:
            other.resu.load_state_dict(state)
            assert other.resu.step_count == compiled.resu.step_count
        else:
            with pytest.raises(ValueError, match="theta_lr_schedule='constant' to load it"):
                other.resu.load_state_dict(state)


def test_loading_a_checkpoint_of_another_managed_set_fails_and_changes_nothing() -> None:
    entry, _, compiled, optimizer = _build("sgd")
    _train(entry, compiled, optimizer, range(8))
    state = compiled.resu.state_dict()
    state["weights"]["head.weight"] = state["weights"].pop("fc3.weight")
    torch._dynamo.reset()
    _, _, fresh, _ = _build("sgd")
    fresh(*entry.make_batch(0))
    with pytest.raises(ValueError, match=r"'fc3\.weight'|'head\.weight'"):
        fresh.resu.load_state_dict(state)
    assert fresh.resu.phase is resu.Phase.TRAIN
    assert all(mask is None for mask in fresh.resu.masks().values())


def test_loading_a_checkpoint_with_other_shapes_fails_and_changes_nothing() -> None:
    entry, _, compiled, optimizer = _build("sgd")
    _train(entry, compiled, optimizer, range(8))
    state = compiled.resu.state_dict()
    state["weights"]["fc2.weight"]["shape"] = [3, 3]
    torch._dynamo.reset()
    _, _, fresh, _ = _build("sgd")
    fresh(*entry.make_batch(0))
    with pytest.raises(ValueError, match=r"shape mismatch for 'fc2\.weight'"):
        fresh.resu.load_state_dict(state)
    assert all(mask is None for mask in fresh.resu.masks().values())


def _mid_resu() -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer, dict]:
    """A run in its RESU phase and everything saved there."""
    entry, model, compiled, optimizer = _build("adamw")
    _train(entry, compiled, optimizer, range(8))
    assert compiled.resu.phase is resu.Phase.RESU
    saved = {
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "resu": copy.deepcopy(compiled.resu.state_dict()),
    }
    return model, compiled, optimizer, saved


def _truncate(state: dict) -> None:
    bits = state["weights"]["fc1.weight"]["mask_bits"]
    state["weights"]["fc1.weight"]["mask_bits"] = bits[:-1]


def _flip_a_mask_bit(state: dict) -> None:
    state["weights"]["fc2.weight"]["mask_bits"][0] ^= 1


def _drop_selection(state: dict) -> None:
    del state["weights"]["fc3.weight"]["select_bits"]
    del state["fingerprints"]["fc3.weight"]["select_bits"]


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda s: s.update(cycle="abc"), "key 'cycle' must be an int, got 'abc'"),
        (lambda s: s.pop("history"), "key 'history' must be a list, got nothing"),
        (lambda s: s.update(history=[{"cycle": 0}]), "key 'history' must be a list of events"),
        (lambda s: s.update(phase="warmup"), "key 'phase' must be a phase name"),
        (lambda s: s.pop("format"), "not a resu-compile controller state of format"),
        (lambda s: s["weights"].update({"fc1.weight": "x"}), r"weights\['fc1\.weight'\] must"),
        (_truncate, r"'mask_bits'\] must be 64 uint8 values .* got 63"),
        (_flip_a_mask_bit, r"weights\['fc2\.weight'\]\['mask_bits'\] does not match"),
        (_drop_selection, r"weights\['fc3\.weight'\] has no 'select_bits'"),
    ],
)
def test_a_truncated_or_tampered_state_is_refused_and_changes_nothing(
    tamper: Callable[[dict], object], message: str
) -> None:
    _, compiled, optimizer, saved = _mid_resu()
    state = saved["resu"]
    tamper(state)
    before = snapshot_run(compiled, optimizer)
    with pytest.raises(ValueError, match=message):
        compiled.resu.load_state_dict(state)
    assert_run_unchanged(before, snapshot_run(compiled, optimizer))


def test_the_untampered_state_loads_into_its_own_run() -> None:
    _, compiled, optimizer, saved = _mid_resu()
    before = snapshot_run(compiled, optimizer)
    compiled.resu.load_state_dict(saved["resu"])
    assert_run_unchanged(before, snapshot_run(compiled, optimizer))


def _fresh(**options: object) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    torch._dynamo.reset()
    entry = ZOO_BY_NAME["mlp"]
    model = entry.build()
    compiled = resu.compile(model, theta_optimizer="adamw", **{**OPTIONS, **options})
    return model, compiled, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("steps_per_cycle", 11),
        ("phase_fractions", (0.5, 0.2, 0.3)),
        ("seed", 1),
        ("gradient_mask", "graph"),
        ("include", ["fc*"]),
    ],
)
def test_a_state_saved_with_other_run_options_is_refused_unless_not_strict(
    option: str, value: object
) -> None:
    *_, saved = _mid_resu()
    model, compiled, optimizer = _fresh(**{option: value})
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    shown = list(value) if isinstance(value, tuple) else value
    expected = f"option '{option}' differs: checkpoint .*, this model {re.escape(repr(shown))}"
    with pytest.raises(ValueError, match=expected):
        compiled.resu.load_state_dict(saved["resu"])
    assert compiled.resu.phase is resu.Phase.TRAIN and compiled.resu.step_count == 0
    with pytest.warns(UserWarning, match=f"option '{option}' differs.*strict=False"):
        compiled.resu.load_state_dict(saved["resu"], strict=False)
    assert compiled.resu.phase is resu.Phase.RESU and compiled.resu.step_count == 8


def test_a_resu_state_loaded_without_the_model_weights_is_refused() -> None:
    *_, saved = _mid_resu()
    model, compiled, optimizer = _fresh()
    optimizer.load_state_dict(saved["optimizer"])
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"weights are nonzero where the checkpoint's masks prune"):
        compiled.resu.load_state_dict(saved["resu"])
    assert compiled.resu.phase is resu.Phase.TRAIN
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), weights[name]), name
    with pytest.warns(UserWarning, match="the masks were applied to them"):
        compiled.resu.load_state_dict(saved["resu"], strict=False)
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        entry = saved["resu"]["weights"][name]
        kept = unpack_bits(entry["mask_bits"], entry["shape"]) | unpack_bits(
            entry["select_bits"], entry["shape"]
        )
        assert torch.count_nonzero(model.get_parameter(name).detach()[~kept]) == 0, name


def test_a_fresh_optimizer_after_a_load_is_refused_at_the_next_step() -> None:
    entry = ZOO_BY_NAME["mlp"]
    *_, saved = _mid_resu()
    for strict in (True, False):
        model, compiled, optimizer = _fresh()
        model.load_state_dict(saved["model"])
        compiled.resu.load_state_dict(saved["resu"], strict=strict)
        optimizer.zero_grad(set_to_none=True)
        entry.loss_fn(compiled(*entry.make_batch(8))).backward()
        if strict:
            before = snapshot_run(compiled, optimizer)
            with pytest.raises(ValueError, match="holds no state for managed weight"):
                compiled.resu.step(optimizer)
            assert_run_unchanged(before, snapshot_run(compiled, optimizer))
        else:
            with pytest.warns(UserWarning, match="holds no state for managed weight"):
                compiled.resu.step(optimizer)
            assert compiled.resu.step_count == 9


def test_model_and_optimizer_resumed_without_the_resu_state_warn() -> None:
    entry = ZOO_BY_NAME["mlp"]
    *_, saved = _mid_resu()
    model, compiled, optimizer = _fresh()
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    optimizer.zero_grad(set_to_none=True)
    entry.loss_fn(compiled(*entry.make_batch(8))).backward()
    with pytest.warns(UserWarning, match="taken 8 steps already but the resu schedule starts"):
        compiled.resu.step(optimizer)
