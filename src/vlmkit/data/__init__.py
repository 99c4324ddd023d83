"""Data: formats, images, prompts, grounding, collation and the ShapesWorld generator."""
