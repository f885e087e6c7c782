"""Models and data the federation trains: a Fashion-MNIST CNN and a MiniLM text classifier."""

# Names only (no torch import), so the gateway's command line can list them without torch.
WORKLOAD_NAMES = ("fmnist-cnn", "fmnist-fedsq", "fmnist-colora", "minilm-fortunes",
                  "minilm-colora")
