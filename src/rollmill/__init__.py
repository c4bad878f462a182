"""rollmill: reinforcement-learning post-training for LLMs and LLM agents."""

__version__ = "0.1.0"
