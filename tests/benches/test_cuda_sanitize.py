"""Every CUDA op of the build is covered where the CPU cannot run it: setup.py's CUDA_OPS, the schemas in
csrc/binding.cpp, the input reasons of hypenet.ops.cuda_ext and the compute-sanitizer cases of benches.cuda_sanitize
name the same ops (the GPU suite's sanitizer part fails on a built op without cases)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from benches.cuda_sanitize import CASES
from hypenet.ops import cuda_ext

ROOT = Path(__file__).resolve().parents[2]


def _setup_cuda_ops() -> set[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CUDA_OPS" for t in node.targets):
            return {key.value for key in node.value.keys}
    raise AssertionError("setup.py has no CUDA_OPS dict")


def _binding_schemas() -> set[str]:
    return set(re.findall(r'"(\w+)\(Tensor', (ROOT / "csrc" / "binding.cpp").read_text()))


def test_every_cuda_op_has_schema_reason_and_sanitizer_cases():
    ops = _setup_cuda_ops()
    assert ops, "no CUDA ops in setup.py"
    assert _binding_schemas() == ops
    assert set(cuda_ext._INPUT_REASONS) == ops
    assert set(CASES) == ops
