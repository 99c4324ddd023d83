"""Inference: batched generation, server, web demo."""
