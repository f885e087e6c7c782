"""Wire contract shared by devices and the aggregator: topics, messages, codec, manifest."""
