"""In-process federated simulations of the five methods on Fashion-MNIST, and the results table."""
