"""Command line and demo of the edge federated LoRA system."""
