"""An OpenAI-compatible model proxy that records the exact tokens of every call for training."""

from rollmill.proxy.records import ProxyCall, calls_to_trajectory
from rollmill.proxy.server import ModelProxy

__all__ = ["ModelProxy", "ProxyCall", "calls_to_trajectory"]
