"""Models and data the federation trains: a Fashion-MNIST CNN and a MiniLM text classifier."""
