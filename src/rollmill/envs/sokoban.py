"""Sokoban in small generated rooms: push every box onto a target.

Rooms are made solvable by construction: start from the solved position (boxes on their targets)
and play random reverse moves, where the player walks or pulls a box. Every reverse move undoes a
legal forward move, so replaying them backwards solves the puzzle.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any

from rollmill.envs.base import register_env
from rollmill.envs.frozenlake import MOVES, parse_direction

Cell = tuple[int, int]


def _connected(floor: set[Cell]) -> bool:
    start = next(iter(floor))
    seen = {start}
    queue = deque([start])
    while queue:
        r, c = queue.popleft()
        for dr, dc in MOVES.values():
            nxt = (r + dr, c + dc)
            if nxt in floor and nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return len(seen) == len(floor)


@register_env("sokoban", "push every box onto a target in a small generated room")
class SokobanEnv:
    """Sokoban with a text grid: # wall, _ floor, P player, B box, T target, X box on target, Q player on target.

    width and height include the outer walls. Each reset seed generates a room with num_boxes boxes
    by playing search_depth random reverse moves from the solved position; starts that are already
    solved are rejected.
    """

    def __init__(self, width: int = 6, height: int = 6, num_boxes: int = 1, max_steps: int | None = None,
                 search_depth: int = 30):
        if num_boxes < 1:
            raise ValueError(f"sokoban num_boxes must be at least 1, got {num_boxes}")
        if width < 4 or height < 4 or (width - 2) * (height - 2) < num_boxes + 3:
            raise ValueError(f"sokoban room {width}x{height} is too small for {num_boxes} box(es)")
        if search_depth < 1:
            raise ValueError(f"sokoban search_depth must be at least 1, got {search_depth}")
        self.width, self.height, self.num_boxes = width, height, num_boxes
        self.max_steps, self.search_depth = max_steps, search_depth
        self.instructions = (
            "You are P in a room drawn as a grid, one row per line: # is a wall, _ is floor, B is a box, "
            "T is a target, X is a box on a target, Q is you standing on a target. Walk into a box to push it "
            "one tile (you cannot pull, and a box will not move into a wall or another box). Put every box "
            "on a target. Reply with one move: left, down, right or up."
        )
        self.done = True

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        rng = random.Random(seed)
        while True:
            self._generate(rng)
            if self.boxes != self.targets:
                break
        self.steps = 0
        self.done = False
        return self.render(), {"state": self.render(), "progress": self.progress()}

    def _generate(self, rng: random.Random) -> None:
        interior = [(r, c) for r in range(1, self.height - 1) for c in range(1, self.width - 1)]
        # A few inner walls make rooms less uniform; keep the floor connected and roomy enough.
        while True:
            walls = set(rng.sample(interior, rng.randint(0, len(interior) // 8)))
            floor = set(interior) - walls
            if len(floor) >= self.num_boxes + 3 and _connected(floor):
                break
        cells = rng.sample(sorted(floor), self.num_boxes + 1)
        self.floor = floor
        self.targets = frozenset(cells[: self.num_boxes])
        boxes = set(self.targets)
        player = cells[-1]
        for _ in range(self.search_depth):
            options = []
            for dr, dc in MOVES.values():
                ahead, behind = (player[0] + dr, player[1] + dc), (player[0] - dr, player[1] - dc)
                if ahead in floor and ahead not in boxes:
                    options.append((ahead, None))
                    if behind in boxes:
                        options.append((ahead, behind))
            if not options:
                break
            ahead, pulled = rng.choice(options)
            if pulled is not None:
                boxes.remove(pulled)
                boxes.add(player)
            player = ahead
        self.boxes, self.player = boxes, player

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self.done:
            raise RuntimeError("sokoban episode is over; call reset()")
        self.steps += 1
        truncated = self.max_steps is not None and self.steps >= self.max_steps
        direction = parse_direction(action)
        invalid = direction is None
        if not invalid:
            self._move(*MOVES[direction])
        success = self.boxes == self.targets
        self.done = success or truncated
        info = {"state": self.render(), "success": success, "invalid_action": invalid, "progress": self.progress()}
        observation = self.render()
        if invalid:
            observation += "\nInvalid action: reply with left, down, right or up."
        return observation, float(success), success, truncated and not success, info

    def _move(self, dr: int, dc: int) -> None:
        ahead = (self.player[0] + dr, self.player[1] + dc)
        if ahead not in self.floor:
            return
        if ahead in self.boxes:
            beyond = (ahead[0] + dr, ahead[1] + dc)
            if beyond not in self.floor or beyond in self.boxes:
                return
            self.boxes.remove(ahead)
            self.boxes.add(beyond)
        self.player = ahead

    def render(self) -> str:
        """The room, one row per line."""
        lines = []
        for r in range(self.height):
            line = []
            for c in range(self.width):
                cell = (r, c)
                target = cell in self.targets
                if cell not in self.floor:
                    line.append("#")
                elif cell == self.player:
                    line.append("Q" if target else "P")
                elif cell in self.boxes:
                    line.append("X" if target else "B")
                else:
                    line.append("T" if target else "_")
            lines.append("".join(line))
        return "\n".join(lines)

    def progress(self) -> float:
        """Fraction of boxes on targets."""
        return len(self.boxes & self.targets) / self.num_boxes
