"""Trainer backends: ExecuTorch (phones), ONNX Runtime training, torch (reference, Jetson)."""
