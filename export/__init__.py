"""Export LoRA-wrapped models into on-device training programs (ExecuTorch, ONNX Runtime)."""
