"""Multi-turn agents: the episode coroutine, chat formatting and action parsing."""

from rollmill.agent.loop import Agent, AgentLoop

__all__ = ["Agent", "AgentLoop"]
