"""Bad input raises a clear error naming the argument, and changes nothing."""

from __future__ import annotations

import pytest
import torch

import resu_compile as resu
from tests.zoo import ZOO_BY_NAME


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sparsity": 1.0}, "option 'sparsity' must be a number in \\[0, 1\\)"),
        ({"sparsity": -0.1}, "option 'sparsity'"),
        ({"sparsity": "0.5"}, "option 'sparsity'"),
        ({"sparsity": float("nan")}, "option 'sparsity'"),
        ({"cycles": 0}, "option 'cycles' must be an integer >= 1"),
        ({"sparsity_level": 0.5}, "unknown option\\(s\\) \\['sparsity_level'\\]"),
        ({"phase_fractions": (0.5, 0.5, 0.5)}, "option 'phase_fractions'"),
        ({"phase_fractions": (1.0, 0.0, 0.0)}, "option 'phase_fractions'"),
        ({"schedule": "exponential"}, "option 'schedule'"),
        ({"schedule": [0.1, 0.2]}, "option 'schedule'"),
        ({"compiler": "tensorrt"}, "option 'compiler' must be one of"),
        ({"alpha": 0.0}, "option 'alpha'"),
        ({"theta_optimizer": "lion"}, "option 'theta_optimizer'"),
        ({"r_start": 2.0}, "option 'r_start'"),
        ({"include": 3}, "option 'include'"),
        ({"steps_per_cycle": 10, "total_steps": 100}, "at most one of"),
        ({"steps_per_cycle": 0}, "option 'steps_per_cycle'"),
        ({"method": "snip"}, "option 'method' must be one of"),
        ({"selection": "best"}, "option 'selection' must be one of"),
        ({"amnesty_score": "taylor"}, "option 'amnesty_score' must be one of"),
        ({"pattern": "4:2", "sparsity": 0.5}, "option 'pattern'"),
        ({"pattern": "2:4"}, "option 'sparsity' must be 0.5 with pattern '2:4'"),
        ({"pattern": "2:4", "sparsity": 0.5, "schedule": "linear"}, "option 'schedule'"),
        ({"pattern": "2:4", "sparsity": 0.5, "method": "rigl"}, "option 'method'"),
        ({"pause_after": [5]}, "option 'pause_after'"),
        ({"on_pause": "train_rl"}, "option 'on_pause'"),
        ({"manual": True, "method": "gmp"}, "option 'manual'"),
        ({"refresh": -1}, "option 'refresh'"),
        ({"consistency_beta": 1.0}, "option 'consistency_beta'"),
        ({"rigl_interval": 0}, "option 'rigl_interval'"),
        ({"freeze_active": "no"}, "option 'freeze_active' must be a bool"),
    ],
)
def test_bad_options_raise_value_error_naming_the_option(options: dict, message: str) -> None:
    model = ZOO_BY_NAME["mlp"].build()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        resu.compile(model, **options)
    _assert_unchanged(model, before)
    with pytest.raises(ValueError, match=message):
        resu.ResuConfig.from_options(options)


def test_bad_options_through_the_backend_name_raise_on_first_call() -> None:
    model = ZOO_BY_NAME["mlp"].build()
    compiled = torch.compile(model, backend="resu", options={"sparsity": 1.5})
    with pytest.raises(Exception, match="option 'sparsity'"):
        compiled(*ZOO_BY_NAME["mlp"].make_batch(0))


def test_model_without_a_matmul_weight_is_refused() -> None:
    model = torch.nn.Sequential(torch.nn.LayerNorm(4))
    with pytest.raises(ValueError, match="no managed weight can be found"):
        resu.compile(model)
    with pytest.raises(ValueError, match="no parameters"):
        resu.compile(torch.nn.ReLU())


def test_embedding_only_model_reports_no_managed_weight_at_step() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(4, 2))
    compiled = resu.compile(model, compiler="aot_eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled(torch.tensor([[1, 2]])).sum().backward()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="no managed weight found"):
        compiled.resu.step(optimizer)
    _assert_unchanged(model, before)


def test_non_float_weight_selected_by_include_is_refused() -> None:
    model = ZOO_BY_NAME["mlp"].build()
    model.codes = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"include selects 'codes' of dtype torch\.int8"):
        resu.compile(model, include=["fc*", "codes"])


def test_meta_device_parameters_are_refused() -> None:
    with torch.device("meta"):
        model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="meta device"):
        resu.compile(model)


def test_step_with_an_optimizer_missing_managed_weights_raises_and_changes_nothing() -> None:
    entry = ZOO_BY_NAME["mlp"]
    model = entry.build()
    compiled = resu.compile(model, sparsity=0.5, steps_per_cycle=4, compiler="aot_eager")
    optimizer = torch.optim.SGD(model.fc3.parameters(), lr=0.1)
    entry.loss_fn(compiled(*entry.make_batch(0))).backward()
    before = _snapshot(model)
    with pytest.raises(
        ValueError, match=r"does not hold managed weight\(s\) \['fc1.weight', 'fc2.weight'\]"
    ):
        compiled.resu.step(optimizer)
    _assert_unchanged(model, before)
    assert compiled.resu.step_count == 0


def test_step_with_something_that_is_not_an_optimizer_raises() -> None:
    entry = ZOO_BY_NAME["mlp"]
    compiled = resu.compile(entry.build(), compiler="aot_eager")
    compiled(*entry.make_batch(0))
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer"):
        compiled.resu.step("sgd")


def test_compiling_twice_is_refused() -> None:
    model = ZOO_BY_NAME["mlp"].build()
    compiled = resu.compile(model, compiler="aot_eager")
    with pytest.raises(ValueError, match="already compiled"):
        resu.compile(model)
    with pytest.raises(ValueError, match="already compiled"):
        resu.compile(compiled)


def test_controller_lookup_of_an_unmanaged_model_raises() -> None:
    with pytest.raises(ValueError, match="not managed by resu-compile"):
        resu.controller(torch.nn.Linear(2, 2))
