"""``torch.compile(model, backend="resu")`` in a fresh process, found through the entry point."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_backend_name_works_without_importing_the_package() -> None:
    out = _run(
        """
        import sys
        import torch
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        compiled = torch.compile(model, backend="resu", options={"compiler": "aot_eager"})
        compiled(torch.randn(3, 4)).sum().backward()
        assert "resu_compile" in sys.modules  # loaded by Dynamo through the entry point
        import resu_compile as resu
        print(resu.controller(model).state.names())
        """
    )
    assert out.strip() == "['0.weight', '2.weight']"


def test_import_then_backend_name_has_no_duplicate_registration() -> None:
    out = _run(
        """
        import importlib
        import torch
        import resu_compile as resu
        importlib.reload(resu)  # registering twice must stay a no-op
        from torch._dynamo import list_backends
        model = torch.nn.Linear(4, 2)
        torch.compile(model, backend="resu", options={"compiler": "aot_eager"})(torch.randn(1, 4))
        print(list_backends().count("resu"), resu.controller(model).state.names())
        """
    )
    assert out.strip() == "1 ['weight']"
