"""Model parts: vision towers, bridges, fusion, LLM wrapper and the composed VisionLanguageModel."""
