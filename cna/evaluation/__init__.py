"""Evaluators: each a function of generations or logits that returns plain values."""
