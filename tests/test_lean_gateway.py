"""The gateway process stays lean: a real, connected `edgefl aggregator` imports none of the
device runtimes (torch, ONNX Runtime, ExecuTorch) nor FL-TAC's scikit-learn until it needs it."""

from __future__ import annotations

from pathlib import Path

from bench.gateway_memory import HEAVY, measure


def test_an_idle_aggregator_imports_no_runtime(cnn_artifacts: Path) -> None:
    # -X importtime lists every module the real process imported, however indirectly
    result = measure(cnn_artifacts, settle_s=0.5)
    assert result["heavy_imports"] == [], f"the gateway imported {result['heavy_imports']}"
    assert set(HEAVY) >= {"torch", "onnxruntime", "executorch"}
    # sanity: the figures are of two live processes, the gateway the larger
    assert result["gateway_rss_mib"] > result["bare_python_rss_mib"] > 0
