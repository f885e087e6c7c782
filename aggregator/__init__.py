"""Gateway aggregator: round coordinator over MQTT, pure aggregation strategies, durable state."""
