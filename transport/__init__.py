"""MQTT transport: the only package that imports paho, plus a broker launcher for demos and tests."""
