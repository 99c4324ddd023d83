"""vlmkit: build, train, evaluate and serve vision-language models from any encoder, bridge and LLM."""

__version__ = "0.1.0"
