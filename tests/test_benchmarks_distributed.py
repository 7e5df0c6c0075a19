"""benchmarks/distributed.py end to end at its tiny size: two gloo ranks per engine on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist

from benchmarks import distributed
from benchmarks.render_results import distributed_section

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is missing")


def test_two_ranks_agree_with_a_single_process_and_ddp_transitions_move_nothing(
    tmp_path: Path,
) -> None:
    out = tmp_path / "distributed.json"
    args = ["--world", "2", "--backend", "gloo", "--size", "tiny", "--models", "gpt2"]
    assert distributed.main([*args, "--steps", "1", "--batch-size", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["torch"] and result["date"] and result["world"] == 2
    runs = {run["engine"]: run for run in result["runs"]}
    assert sorted(runs) == ["ddp", "fsdp2"]
    for engine, run in runs.items():
        assert list(run["phases"]) == list(distributed.PHASES)
        assert all(cell["ratio"] > 0 for cell in run["phases"].values())
        assert [t["event"] for t in run["transitions"]] == list(distributed.TRANSITIONS)
        for transition in run["transitions"]:
            assert transition["ranks_agree"] and transition["same_as_single"], engine
            assert transition["bits_agreeing_with_single"] == 1.0
            bytes_moved = transition["bytes_per_rank"]
            # DDP ranks decide alike with no communication; FSDP2 ranks exchange counts.
            assert (max(bytes_moved) == 0) == (engine == "ddp"), (engine, bytes_moved)
    section = distributed_section(result)
    assert "### 2 ranks (gloo): DDP and FSDP2" in section
    assert section.count("| gpt2 ") == 2 * (len(distributed.PHASES) + len(distributed.TRANSITIONS))


def test_bad_arguments_are_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    for bad, word in ((["--models", "bert"], "--models"), (["--steps", "0"], "--steps")):
        with pytest.raises(SystemExit):
            distributed.parse_args(["--backend", "gloo", *bad])
        assert word in capsys.readouterr().err
