"""FrozenLake as a text env: walk from the top-left corner to the goal without falling in a hole.

The dynamics follow gymnasium's FrozenLake-v1 (same maps, same slippery rule), but the board is
drawn compactly (one character per tile) so that even a tiny character-level model can read it.
"""

from __future__ import annotations

import random
import string
from collections import deque
from typing import Any

from rollmill.envs.base import register_env

# gymnasium's action order; slipping picks the intended action or one of its two neighbours here.
LEFT, DOWN, RIGHT, UP = range(4)
MOVES = {LEFT: (0, -1), DOWN: (1, 0), RIGHT: (0, 1), UP: (-1, 0)}
DIRECTIONS = {
    "left": LEFT, "l": LEFT, "down": DOWN, "d": DOWN, "right": RIGHT, "r": RIGHT, "up": UP, "u": UP,
}

STANDARD_MAPS = {
    4: ["SFFF", "FHFH", "FFFH", "HFFG"],
    8: ["SFFFFFFF", "FFFFFFFF", "FFFHFFFF", "FFFFFHFF", "FFFHFFFF", "FHHFFFHF", "FHFFHFHF", "FFFHFFFG"],
}
TILE_CHARS = {"S": "_", "F": "_", "H": "O", "G": "G"}


def parse_direction(text: str) -> int | None:
    """The direction named by `text` (left/down/right/up or l/d/r/u, any case), else None."""
    word = text.strip().strip(string.punctuation + string.whitespace).lower()
    return DIRECTIONS.get(word)


def distances_to_goal(rows: list[str]) -> dict[tuple[int, int], int]:
    """Shortest safe path length (steps over non-hole tiles) from every cell that can reach the goal."""
    size = len(rows)
    goal = next((r, c) for r in range(size) for c in range(size) if rows[r][c] == "G")
    dist = {goal: 0}
    queue = deque([goal])
    while queue:
        r, c = queue.popleft()
        for dr, dc in MOVES.values():
            nr, nc = r + dr, c + dc
            if 0 <= nr < size and 0 <= nc < size and rows[nr][nc] != "H" and (nr, nc) not in dist:
                dist[(nr, nc)] = dist[(r, c)] + 1
                queue.append((nr, nc))
    return dist


def random_map(size: int, rng: random.Random, frozen_prob: float = 0.8) -> list[str]:
    """A size x size map with start top-left and goal bottom-right, redrawn until the goal is reachable."""
    while True:
        cells = [["F" if rng.random() < frozen_prob else "H" for _ in range(size)] for _ in range(size)]
        cells[0][0], cells[-1][-1] = "S", "G"
        rows = ["".join(row) for row in cells]
        if (0, 0) in distances_to_goal(rows):
            return rows


@register_env("frozenlake", "walk across a frozen lake to the goal without falling in a hole")
class FrozenLakeEnv:
    """FrozenLake with a compact text grid: P player, _ frozen, O hole, G goal.

    map="standard" uses gymnasium's classic 4x4 or 8x8 map; map="random" draws a new solvable map
    from each reset seed. With slippery=True a move goes the intended way with probability 1/3 and
    each perpendicular way with 1/3, as in gymnasium. All randomness comes from the reset seed.
    """

    def __init__(self, size: int = 4, slippery: bool = False, map: str = "standard", max_steps: int | None = None,
                 view: str = "grid"):
        if map not in ("standard", "random"):
            raise ValueError(f"frozenlake map must be 'standard' or 'random', got {map!r}")
        if map == "standard" and size not in STANDARD_MAPS:
            raise ValueError(f"frozenlake standard maps are {sorted(STANDARD_MAPS)} wide, not {size}; use map='random'")
        if view not in ("grid", "cell"):
            raise ValueError(f"frozenlake view must be 'grid' or 'cell', got {view!r}")
        if view == "cell" and size * size > 26:
            raise ValueError(f"frozenlake view 'cell' names cells A-Z, so size must be at most 5, not {size}")
        if size < 2:
            raise ValueError(f"frozenlake size must be at least 2, got {size}")
        self.size, self.slippery, self.map, self.max_steps = size, slippery, map, max_steps
        self.view = view
        self.instructions = (
            "You are P on a frozen lake drawn as a grid, one row per line: _ is frozen ice, O is a hole, "
            "G is the goal. Reach G without stepping into a hole; moving into the edge leaves you in place."
            + (" The ice is slippery: you may slide sideways instead of where you meant to go." if slippery else "")
            + " Reply with one move: left, down, right or up."
        )
        self.rows: list[str] = []
        self.done = True

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        self.rng = random.Random(seed)
        self.rows = STANDARD_MAPS[self.size] if self.map == "standard" else random_map(self.size, self.rng)
        self.map_text = "/".join(self.rows)
        self.dist = distances_to_goal(self.rows)
        self.pos = (0, 0)
        self.steps = 0
        self.done = False
        return self.render(), {"state": self.state(), "progress": self.progress()}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self.done:
            raise RuntimeError("frozenlake episode is over; call reset()")
        self.steps += 1
        truncated = self.max_steps is not None and self.steps >= self.max_steps
        direction = parse_direction(action)
        if direction is None:
            self.done = truncated
            note = "Invalid action: reply with left, down, right or up."
            info = {"state": self.state(), "success": False, "invalid_action": True, "progress": self.progress()}
            return f"{note}\n{self.render()}", 0.0, False, truncated, info
        if self.slippery:
            direction = self.rng.choice([(direction - 1) % 4, direction, (direction + 1) % 4])
        dr, dc = MOVES[direction]
        row = min(max(self.pos[0] + dr, 0), self.size - 1)
        col = min(max(self.pos[1] + dc, 0), self.size - 1)
        self.pos = (row, col)
        tile = self.rows[row][col]
        success = tile == "G"
        terminated = tile in "GH"
        self.done = terminated or truncated
        info = {"state": self.state(), "success": success, "invalid_action": False, "progress": self.progress()}
        return self.render(), float(success), terminated, truncated and not terminated, info

    def render(self) -> str:
        """view "grid": the board, one row per line, with P on the player's tile, and the position in
        words. view "cell": one letter naming the player's cell (A = top left, row by row), the
        tabular view, with which a tiny model trained from scratch can tell states apart."""
        if self.view == "cell":
            return chr(ord("A") + self.pos[0] * self.size + self.pos[1])
        lines = []
        for r, row in enumerate(self.rows):
            chars = [TILE_CHARS[tile] for tile in row]
            if r == self.pos[0]:
                chars[self.pos[1]] = "P"
            lines.append("".join(chars))
        lines.append(f"You are at row {self.pos[0] + 1}, column {self.pos[1] + 1}.")
        return "\n".join(lines)

    def state(self) -> str:
        return f"{self.map_text}|{self.pos[0]},{self.pos[1]}"

    def progress(self) -> float:
        """1 - (shortest safe path to the goal from here) / (from the start): 0 in a hole, 1 on the goal."""
        here = self.dist.get(self.pos)
        if here is None:  # a hole (or, never in practice, a cell cut off from the goal)
            return 0.0
        start = self.dist[(0, 0)]
        return min(max(1.0 - here / start, 0.0), 1.0)
