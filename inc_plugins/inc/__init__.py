"""Thin adapters between the project's algorithms and INC 3.7's pruning registries."""
