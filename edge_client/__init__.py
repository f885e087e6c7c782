"""Device runtime: trainers (ExecuTorch, ONNX Runtime, torch reference) and the MQTT device agent."""
