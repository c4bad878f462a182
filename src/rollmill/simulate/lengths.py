"""Reply-length distributions. A prompt's samples are correlated (a hard prompt makes every sample
long), so a model draws a prompt first and then that prompt's samples:

- `prompt(rng)`: a new prompt's hidden difficulty (whatever `sample` needs);
- `sample(prompt, n, rng)`: n reply lengths for that prompt (fresh ones on every call: a deferred
  prompt sampled again in a long round gets new replies from the same distribution).

Any object with these two methods works as a length model (the tests build deterministic ones)."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

Z99 = 2.3263478740408408  # the standard normal's 99th percentile


@dataclass(frozen=True)
class FixedLengths:
    """Every reply has `length` tokens."""

    length: int

    def prompt(self, rng: random.Random) -> None:
        return None

    def sample(self, prompt: None, n: int, rng: random.Random) -> list[int]:
        return [self.length] * n


@dataclass(frozen=True)
class EmpiricalLengths:
    """Measured groups of reply lengths: a prompt is one recorded group, drawn uniformly; its samples
    are that group's lengths in random order, and beyond the group's size, draws from it with
    replacement (a short round asks for more samples than a group recorded)."""

    groups: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        if not self.groups or not all(self.groups):
            raise ValueError("empirical lengths need at least one non-empty group")

    def prompt(self, rng: random.Random) -> int:
        return rng.randrange(len(self.groups))

    def sample(self, prompt: int, n: int, rng: random.Random) -> list[int]:
        group = list(self.groups[prompt])
        rng.shuffle(group)
        return (group + [rng.choice(group) for _ in range(n - len(group))])[:n]


@dataclass(frozen=True)
class LogNormalLengths:
    """Heavy-tailed lengths: lognormal with the given median and 99th percentile, capped at `cap`
    (the reply budget). `prompt_share` is the share of the log-length variance that belongs to the
    prompt (its difficulty), the rest varies between a prompt's samples; the mixture over prompts keeps
    the overall median and p99."""

    median: float
    p99: float
    cap: int
    prompt_share: float = 0.5

    def __post_init__(self):
        if not 0 < self.median < self.p99:
            raise ValueError("lognormal lengths need 0 < median < p99")
        if not 0.0 <= self.prompt_share <= 1.0:
            raise ValueError("prompt_share is a share of the variance, in [0, 1]")

    @property
    def sigma(self) -> float:
        return math.log(self.p99 / self.median) / Z99

    def prompt(self, rng: random.Random) -> float:
        return rng.gauss(math.log(self.median), self.sigma * math.sqrt(self.prompt_share))

    def sample(self, prompt: float, n: int, rng: random.Random) -> list[int]:
        spread = self.sigma * math.sqrt(1.0 - self.prompt_share)
        return [min(self.cap, max(1, round(math.exp(rng.gauss(prompt, spread))))) for _ in range(n)]


def groups_from_record(path: str | Path) -> EmpiricalLengths:
    """The recorded groups of a measured record (`benchmarks/long_tail.py --record`)."""
    return EmpiricalLengths(tuple(tuple(int(x) for x in g) for g in json.loads(Path(path).read_text())["groups"]))


def parse_lengths(spec: str):
    """A length model from text: `fixed:N`, `lognormal:median=M,p99=Q,cap=C[,prompt_share=S]`, or
    `empirical:FILE.json` (a measured record's groups)."""
    kind, _, rest = spec.partition(":")
    if kind == "fixed":
        return FixedLengths(int(rest))
    if kind == "empirical":
        return groups_from_record(rest)
    if kind == "lognormal":
        fields = dict(item.split("=", 1) for item in rest.split(",") if item)
        unknown = set(fields) - {"median", "p99", "cap", "prompt_share"}
        if unknown or not {"median", "p99", "cap"} <= set(fields):
            raise ValueError(f"lognormal lengths take median, p99, cap and optionally prompt_share; got {rest!r}")
        return LogNormalLengths(median=float(fields["median"]), p99=float(fields["p99"]), cap=int(fields["cap"]),
                                prompt_share=float(fields.get("prompt_share", 0.5)))
    raise ValueError(f"unknown length distribution {spec!r}: use fixed:N, lognormal:... or empirical:FILE")
