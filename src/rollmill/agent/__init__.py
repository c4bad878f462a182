"""Multi-turn agents: the episode loop, chat formatting and action parsing, trajectories."""

from rollmill.agent.loop import AgentLoop
from rollmill.agent.trajectory import Row, Trajectory, Turn

__all__ = ["AgentLoop", "Row", "Trajectory", "Turn"]
