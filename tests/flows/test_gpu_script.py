"""benchmarks/gpu.py cannot rot between runs on a GPU: its quick CPU mode runs every step and prints the table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


def test_the_gpu_script_runs_every_step_on_the_cpu(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    gpu = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, gpu)  # dataclasses look their module up there
    spec.loader.exec_module(gpu)
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--device", "cpu", "--quick"])
    threads = torch.get_num_threads()
    try:
        assert gpu.main() == 0  # no code path failed
    finally:
        torch.set_num_threads(threads)
    table = capsys.readouterr().out
    for section in ("1 extraction", "2 student waits", "3 cache's promise", "4 code paths", "5 JPEG decoding"):
        assert section in table, section
    assert "FAIL" not in table
