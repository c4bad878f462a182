import math
import sys
import types
from collections import deque

import pytest

from rollmill.envs import ENVS, Env, make_env
from rollmill.envs.calculator import parse_call, safe_eval
from rollmill.envs.frozenlake import distances_to_goal
from rollmill.envs.guess import wordle_feedback
from rollmill.envs.sokoban import SokobanEnv
from rollmill.envs.task_env import TaskEnv

OPTIMAL_4X4 = ["down", "down", "right", "down", "right", "right"]


def play(env, actions):
    return [env.step(a) for a in actions]


def test_every_builtin_env_is_registered_and_follows_the_protocol():
    assert {"frozenlake", "sokoban", "guess_number", "wordle", "calculator", "task", "gymnasium", "gem"} <= set(ENVS)
    for name in ("frozenlake", "sokoban", "guess_number", "wordle", "calculator"):
        env = make_env(name)
        assert isinstance(env, Env) and env.instructions
        obs, info = env.reset(seed=3)
        assert isinstance(obs, str) and hash(info["state"]) is not None and 0.0 <= info["progress"] <= 1.0


def test_make_env_rejects_unknown_kwargs_naming_the_allowed_ones():
    with pytest.raises(ValueError, match="slipery.*allowed.*slippery"):
        make_env("frozenlake", slipery=True)
    with pytest.raises(ValueError, match="unknown env 'nope'"):
        make_env("nope")


def test_frozenlake_optimal_path_reaches_goal_with_hand_checked_progress():
    env = make_env("frozenlake")
    obs, info = env.reset(seed=0)
    assert obs == "P___\n_O_O\n___O\nO__G\nYou are at row 1, column 1."
    assert info["state"] == "SFFF/FHFH/FFFH/HFFG|0,0" and info["progress"] == 0.0
    steps = play(env, OPTIMAL_4X4)
    # Safe distances to the goal along the path: 6 (start), 5, 4, 3, 2, 1, 0.
    assert [s[4]["progress"] for s in steps] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])
    assert [s[2] for s in steps] == [False] * 5 + [True]
    obs, reward, terminated, truncated, info = steps[-1]
    assert reward == 1.0 and terminated and not truncated and info["success"]
    assert obs == "____\n_O_O\n___O\nO__P\nYou are at row 4, column 4." and info["state"].endswith("|3,3")
    with pytest.raises(RuntimeError):
        env.step("up")


def test_frozenlake_hole_wall_and_invalid_action():
    env = make_env("frozenlake")
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step("  LEFT. ")  # into the edge: stays, still valid
    assert not info["invalid_action"] and info["state"].endswith("|0,0") and not terminated
    obs, reward, terminated, truncated, info = env.step("jump!")
    assert info["invalid_action"] and reward == 0.0 and not terminated
    assert info["state"].endswith("|0,0") and obs.startswith("Invalid action") and obs.endswith("P___\n_O_O\n___O\nO__G\nYou are at row 1, column 1.")
    obs, reward, terminated, truncated, info = play(env, ["d", "r"])[-1]  # (1,1) is a hole
    assert terminated and not truncated and reward == 0.0 and not info["success"] and info["progress"] == 0.0

    env = make_env("frozenlake", max_steps=3)
    env.reset(seed=0)
    _, _, terminated, truncated, _ = play(env, ["up", "up", "up"])[-1]
    assert truncated and not terminated


def test_frozenlake_same_seed_same_random_map_and_slips():
    def run(seed):
        env = make_env("frozenlake", size=6, slippery=True, map="random")
        first, _ = env.reset(seed=seed)
        states = []
        for action in ["right", "down"] * 6:
            _, _, terminated, _, info = env.step(action)
            states.append(info["state"])
            if terminated:
                break
        return first, states

    assert run(5) == run(5)
    maps = {run(seed)[0] for seed in range(10)}
    assert len(maps) > 1
    # Slipping must sometimes move sideways: the same action sequence ends in different places.
    assert len({tuple(run(seed)[1]) for seed in range(10)}) > 1
    env = make_env("frozenlake", slippery=True)
    outcomes = set()
    for seed in range(30):
        env.reset(seed=seed)
        outcomes.add(env.step("right")[4]["state"])
    assert outcomes == {"SFFF/FHFH/FFFH/HFFG|0,0", "SFFF/FHFH/FFFH/HFFG|0,1", "SFFF/FHFH/FFFH/HFFG|1,0"}


def test_frozenlake_random_maps_are_solvable():
    for size in (4, 6, 8):
        env = make_env("frozenlake", size=size, map="random")
        for seed in range(100):
            env.reset(seed=seed)
            assert (0, 0) in distances_to_goal(env.rows), (size, seed)
            assert env.rows[0][0] == "S" and env.rows[-1][-1] == "G"


def solve_sokoban(env: SokobanEnv, limit: int = 200_000) -> list[str] | None:
    """Breadth-first search over (player, boxes) with the env's own push rules."""
    moves = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
    start = (env.player, frozenset(env.boxes))
    parents = {start: None}
    queue = deque([start])
    while queue and len(parents) < limit:
        player, boxes = queue.popleft()
        if boxes == env.targets:
            path = []
            node = (player, boxes)
            while parents[node] is not None:
                node, move = parents[node]
                path.append(move)
            return path[::-1]
        for name, (dr, dc) in moves.items():
            ahead = (player[0] + dr, player[1] + dc)
            if ahead not in env.floor:
                continue
            new_boxes = boxes
            if ahead in boxes:
                beyond = (ahead[0] + dr, ahead[1] + dc)
                if beyond not in env.floor or beyond in boxes:
                    continue
                new_boxes = boxes - {ahead} | {beyond}
            node = (ahead, new_boxes)
            if node not in parents:
                parents[node] = ((player, boxes), name)
                queue.append(node)
    return None


@pytest.mark.parametrize("kwargs", [{}, {"num_boxes": 2, "width": 7, "height": 7}])
def test_sokoban_generated_rooms_are_solvable_and_not_solved(kwargs):
    env = make_env("sokoban", **kwargs)
    for seed in range(20):
        obs, info = env.reset(seed=seed)
        assert obs == make_env("sokoban", **kwargs).reset(seed=seed)[0]  # deterministic per seed
        assert info["progress"] < 1.0 and obs.count("P") + obs.count("Q") == 1
        solution = solve_sokoban(env)
        assert solution, f"seed {seed} unsolvable:\n{obs}"
        steps = play(env, solution)
        assert steps[-1][1] == 1.0 and steps[-1][2] and steps[-1][4]["success"]


def test_sokoban_push_rules():
    env = make_env("sokoban")
    env.reset(seed=0)
    # A hand-made open room: player, box and target in a row.
    env.floor = {(r, c) for r in range(1, 5) for c in range(1, 5)}
    env.targets, env.boxes, env.player = frozenset({(1, 3)}), {(1, 2)}, (1, 1)
    obs, reward, terminated, _, info = env.step("right")
    assert obs.splitlines()[1] == "#_PX_#" and reward == 1.0 and terminated and info["success"]
    assert info["progress"] == 1.0 and info["state"] == obs

    env.reset(seed=0)
    env.floor = {(r, c) for r in range(1, 5) for c in range(1, 5)}
    env.targets, env.boxes, env.player = frozenset({(4, 1)}), {(1, 4)}, (1, 3)
    obs, reward, terminated, _, info = env.step("r")  # box against the wall does not move, nor the player
    assert obs.splitlines()[1] == "#__PB#" and not terminated and not info["invalid_action"]
    obs, _, _, _, info = env.step("push it")
    assert info["invalid_action"] and obs.splitlines()[1] == "#__PB#"
    obs, _, _, _, _ = env.step("d")
    obs, _, _, _, info = env.step("u")
    assert obs.splitlines()[1] == "#__PB#"
    env.boxes = {(1, 4), (1, 3)}
    env.player = (1, 2)
    obs, *_ = env.step("right")  # two boxes in a row cannot be pushed
    assert obs.splitlines()[1] == "#_PBB#"


def test_guess_number_binary_search_and_intervals():
    env = make_env("guess_number")
    limit = math.ceil(math.log2(16)) + 1
    for seed in range(20):
        _, info = env.reset(seed=seed)
        assert info["state"] == "1-16" and info["progress"] == 0.0
        lo, hi = 1, 16
        for turn in range(1, limit + 1):
            guess = (lo + hi) // 2
            obs, reward, terminated, _, info = env.step(f"My guess is {guess}.")
            if terminated:
                assert obs == f"{guess}: correct" and reward == 1.0 and info["success"] and info["progress"] == 1.0
                break
            if obs.endswith("higher"):
                lo = guess + 1
            else:
                assert obs.endswith("lower")
                hi = guess - 1
            assert info["state"] == f"{lo}-{hi}" and info["progress"] == pytest.approx(1 - (hi - lo) / 15)
        assert terminated and turn <= limit

    env.reset(seed=0)
    secret = env.secret
    obs, _, _, _, info = env.step("no idea")
    assert info["invalid_action"] and info["state"] == "1-16"
    obs, _, _, _, info = env.step("1 2 3 4")  # one guess per turn, not a list
    assert info["invalid_action"] and obs == "Invalid action: reply with exactly one integer." and env.guesses == 0
    out_of_range = 100 if secret < 100 else 0
    _, _, _, _, info = env.step(str(out_of_range))
    assert info["state"] == "1-16"

    env = make_env("guess_number", max_guesses=2)
    env.reset(seed=0)
    wrong = 1 if env.secret != 1 else 2
    _, reward, terminated, _, info = play(env, [str(wrong), str(wrong)])[-1]
    assert terminated and reward == 0.0 and not info["success"]


def test_wordle_feedback_counts_duplicate_letters():
    assert wordle_feedback("apple", "paper") == "YYGY_"
    assert wordle_feedback("apple", "apple") == "GGGGG"
    assert wordle_feedback("abbey", "babes") == "YYGG_"
    assert wordle_feedback("crane", "eerie") == "__Y_G"  # one e is green, the other e has none left
    assert wordle_feedback("speed", "eerie") == "YY___"
    assert wordle_feedback("robot", "ooooo") == "_G_G_"


def test_wordle_episode():
    env = make_env("wordle")
    _, info = env.reset(seed=1)
    secret = env.secret
    other = make_env("wordle")
    other.reset(seed=1)
    assert other.secret == secret
    obs, _, _, _, info = env.step("hi there")
    assert info["invalid_action"] and info["state"] == "()"
    wrong = "zzzzz" if "z" not in secret else "qqqqq"
    obs, reward, terminated, _, info = env.step(wrong.upper())
    assert obs == f"{wrong} -> _____" and reward == 0.0 and not terminated and info["progress"] == 0.0
    near = secret[:4] + ("q" if secret[4] != "q" else "z")
    _, _, _, _, info = env.step(near)
    assert info["progress"] == pytest.approx(0.8) and info["state"] == str((f"{wrong} -> _____", f"{near} -> GGGG_"))
    obs, reward, terminated, _, info = env.step(f" {secret}! ")
    assert obs == f"{secret} -> GGGGG" and reward == 1.0 and terminated and info["success"] and info["progress"] == 1.0

    env.reset(seed=1)
    _, reward, terminated, _, info = play(env, [wrong] * 6)[-1]
    assert terminated and reward == 0.0 and not info["success"]


def test_safe_eval():
    assert safe_eval("2 + 3 * 4") == 14
    assert safe_eval("(2 + 3) * 4") == 20
    assert safe_eval("-2 ** 2") == -4 and safe_eval("2 ** 10") == 1024
    assert safe_eval("7 // 2 + 7 % 2 + 1 / 4") == 4.25
    for bad in ["__import__('os')", "().__class__", "x", "2 ** 100", "1 / 0", "[1]", "9" * 120, "2 +", "1 if 1 else 2"]:
        with pytest.raises(ValueError):
            safe_eval(bad)


def test_calculator_tool_forms_and_answers():
    env = make_env("calculator")
    question, info = env.reset(seed=7)
    assert question.startswith("What is ") and question == make_env("calculator").reset(seed=7)[0]
    expression = question[len("What is "):-1]
    truth = safe_eval(expression)
    assert parse_call('{"name": "calculator", "arguments": {"expression": "1+1"}}') == ("calculator", "1+1")
    assert parse_call('{"name": "answer", "arguments": "{\\"value\\": 5}"}') == ("answer", 5)
    assert parse_call("Calculator: 1+1") == ("calculator", "1+1")

    call = f'{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}'
    obs, reward, terminated, _, info = env.step(call)
    assert obs == f"calculator result: {truth}" and reward == 0.0 and not terminated
    assert info["state"] == f"{question}|calls=1"
    obs, _, _, _, info = env.step("calculator: __import__('os').system('true')")
    assert obs.startswith("calculator error:") and not info["invalid_action"]
    obs, _, _, _, info = env.step("what is it?")
    assert info["invalid_action"] and info["state"] == f"{question}|calls=2"
    _, _, _, _, info = env.step("answer: twelve")
    assert info["invalid_action"]
    obs, reward, terminated, _, info = env.step(f"answer: {truth}")
    assert reward == 1.0 and terminated and info["success"] and info["progress"] == 1.0

    env.reset(seed=7)
    _, reward, terminated, _, info = env.step(f'{{"name": "answer", "arguments": {{"value": {truth + 1}}}}}')
    assert reward == 0.0 and terminated and not info["success"]

    env = make_env("calculator", max_calls=1)
    env.reset(seed=0)
    assert env.step("calculator: 1+1")[0] == "calculator result: 2"
    assert "no calls left" in env.step("calculator: 1+1")[0]


def test_task_env_scores_arithmetic():
    env = make_env("task", size=20)
    prompt, info = env.reset(seed=3)
    assert info["state"] == prompt and "larger" in prompt
    answer = env.example.answer
    _, reward, terminated, _, info = env.step(f"{answer}")
    assert reward == 1.0 and terminated and info["success"] and not info["reward_failed"]
    env.reset(seed=3)
    _, reward, _, _, info = env.step(str(int(answer) + 1))
    assert reward == 0.0 and not info["success"]
    assert make_env("task", size=20).reset(seed=23)[0] == prompt  # seed % len(examples)


def test_task_env_reports_reward_failures():
    from rollmill.config import RewardConfig
    from rollmill.tasks import Example

    env = TaskEnv([Example(id="x", prompt="Say hi.", answer="hi")], RewardConfig())
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step("42")  # an integer reply makes first_integer read the bad answer
    assert reward == 0.0 and terminated and info["reward_failed"] and "not an integer" in info["error"]


def test_gymnasium_adapter_frozenlake():
    pytest.importorskip("gymnasium")
    env = make_env("gymnasium", env_id="FrozenLake-v1", action_names=["left", "down", "right", "up"], is_slippery=False)
    obs, info = env.reset(seed=0)
    assert "FHFH" in obs and info["state"] == "0"
    assert "\x1b" not in obs and "[41m" not in obs  # gymnasium colours the agent's cell with ANSI escapes
    _, _, _, _, info = env.step("fly")
    assert info["invalid_action"] and info["state"] == "0"
    steps = play(env, ["DOWN", "1", "right", "down", "right", "right"])
    obs, reward, terminated, truncated, info = steps[-1]
    assert reward == 1.0 and terminated and info["success"] and info["state"] == "15"
    env.close()


def test_gem_adapter_with_fake_gem(monkeypatch):
    class FakeGemEnv:
        closed = False

        def reset(self, seed=None):
            return f"say yes (seed {seed})", {}

        def step(self, action):
            return "done", float(action == "yes"), True, False, {}

        def close(self):
            self.closed = True

    made = {}

    def fake_make(env_id, **kwargs):
        made.update(env_id=env_id, **kwargs)
        return FakeGemEnv()

    monkeypatch.setitem(sys.modules, "gem", types.SimpleNamespace(make=fake_make))
    env = make_env("gem", env_id="game:Fake-v0", difficulty=2)
    assert made == {"env_id": "game:Fake-v0", "difficulty": 2} and env.instructions
    assert env.reset(seed=4) == ("say yes (seed 4)", {})
    assert env.step("yes") == ("done", 1.0, True, False, {"success": True})
    env.reset()
    assert env.step("no")[4]["success"] is False
    env.close()
    assert env.env.closed


def test_optional_adapters_say_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gem", None)
    monkeypatch.setitem(sys.modules, "gymnasium", None)
    with pytest.raises(ImportError, match="pip install gem-llm"):
        make_env("gem", env_id="game:Fake-v0")
    with pytest.raises(ImportError, match="pip install gymnasium"):
        make_env("gymnasium", env_id="FrozenLake-v1")


def test_latency_env_waits_before_each_step_and_otherwise_is_the_inner_env():
    import time

    inner = make_env("guess_number", low=1, high=4)
    env = make_env("latency", env="guess_number", env_kwargs={"low": 1, "high": 4}, median_s=0.05, sigma=0.0)
    assert env.instructions == inner.instructions and env.reset(3) == inner.reset(3)
    start = time.monotonic()
    assert env.step("2") == inner.step("2")
    assert time.monotonic() - start >= 0.05
    with pytest.raises(ValueError, match="median_s >= 0"):
        make_env("latency", env="guess_number", median_s=-1.0)
