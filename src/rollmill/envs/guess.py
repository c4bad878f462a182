"""Guessing games: find a secret number from higher/lower hints, and Wordle."""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from typing import Any

from rollmill.envs.base import register_env

INTEGER = re.compile(r"-?\d+")

# Common 5-letter words for Wordle secrets; guesses may be any five letters.
WORDS = """
about above actor adult after again agree alarm album alive allow alone along angry apple arise
array audio award aware basic beach began begin being below bench birth black blame blind block
blood board brain bread break brick brief bring broad brown brush build bunch buyer cabin cable
candy carry catch cause chain chair chalk charm cheap check chest chief child civil claim class
clean clear climb clock close cloud coach coast could count court cover craft crane cream crime
cross crowd dance death delay depth dirty doubt dozen draft drama dream dress drink drive early
earth eight empty enemy enjoy enter entry equal error event every exact extra faith false fault
field fifth fight final first flame floor focus force frame fresh front fruit funny ghost giant
glass globe grace grade grain grand grant grass great green group guard guess guest guide happy
heart heavy horse hotel house human humor ideal image index inner input issue joint judge knife
""".split()


@register_env("guess_number", "find a secret integer from higher/lower hints")
class GuessNumberEnv:
    """Guess a secret integer in [low, high]; each guess is answered "higher", "lower" or "correct".

    A reply must hold exactly one integer (words around it are fine); anything else is an invalid
    action. info state is the interval "lo-hi" still consistent with the hints. With max_guesses set, the
    episode ends (unsolved) after that many guesses.
    """

    def __init__(self, low: int = 1, high: int = 16, max_guesses: int | None = None):
        if high <= low:
            raise ValueError(f"guess_number needs low < high, got low={low}, high={high}")
        self.low, self.high, self.max_guesses = low, high, max_guesses
        self.instructions = (
            f"I am thinking of an integer from {low} to {high}. Reply with one integer as your guess; "
            "I answer higher (the secret is larger), lower (it is smaller) or correct."
        )
        self.done = True

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        self.secret = random.Random(seed).randint(self.low, self.high)
        self.lo, self.hi = self.low, self.high
        self.guesses = 0
        self.done = False
        observation = f"Guess the integer from {self.low} to {self.high}."
        return observation, {"state": self.state(), "progress": self.progress(False)}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self.done:
            raise RuntimeError("guess_number episode is over; call reset()")
        found = INTEGER.findall(action)
        if len(found) != 1:  # several numbers would be several guesses for the price of one
            info = {"state": self.state(), "success": False, "invalid_action": True, "progress": self.progress(False)}
            return "Invalid action: reply with exactly one integer.", 0.0, False, False, info
        guess = int(found[0])
        self.guesses += 1
        success = guess == self.secret
        if success:
            feedback = "correct"
            self.lo = self.hi = guess
        elif guess < self.secret:
            feedback = "higher"
            self.lo = max(self.lo, guess + 1)
        else:
            feedback = "lower"
            self.hi = min(self.hi, guess - 1)
        out_of_guesses = self.max_guesses is not None and self.guesses >= self.max_guesses
        terminated = success or out_of_guesses
        self.done = terminated
        observation = f"{guess}: {feedback}"
        if out_of_guesses and not success:
            observation += f"\nNo guesses left; the number was {self.secret}."
        info = {"state": self.state(), "success": success, "invalid_action": False, "progress": self.progress(success)}
        return observation, float(success), terminated, False, info

    def state(self) -> str:
        return f"{self.lo}-{self.hi}"

    def progress(self, success: bool) -> float:
        """1 - (consistent interval size - 1) / (high - low); 1.0 once guessed."""
        return 1.0 if success else 1.0 - (self.hi - self.lo) / (self.high - self.low)


def wordle_feedback(secret: str, guess: str) -> str:
    """Per letter: G right place, Y in the word elsewhere, _ absent (duplicates counted as in Wordle)."""
    marks = ["_"] * len(guess)
    # Letters of the secret not matched exactly are what yellows may use, each at most once.
    unmatched = Counter(s for s, g in zip(secret, guess) if s != g)
    for i, (s, g) in enumerate(zip(secret, guess)):
        if s == g:
            marks[i] = "G"
        elif unmatched[g] > 0:
            marks[i] = "Y"
            unmatched[g] -= 1
    return "".join(marks)


@register_env("wordle", "guess a secret 5-letter word from per-letter feedback")
class WordleEnv:
    """Wordle: guess a secret 5-letter word in max_guesses tries; feedback like "crane -> G_Y__".

    info state is the tuple of feedback lines so far; progress is the best guess's greens / 5.
    """

    def __init__(self, max_guesses: int = 6):
        if max_guesses < 1:
            raise ValueError(f"wordle max_guesses must be at least 1, got {max_guesses}")
        self.max_guesses = max_guesses
        self.instructions = (
            f"Guess the secret 5-letter English word in {max_guesses} tries. Reply with one 5-letter word. "
            "Each guess is marked letter by letter: G the letter is in the right place, Y it is in the word "
            "elsewhere, _ it is not in the word (a repeated letter is marked only as often as the word has it)."
        )
        self.done = True

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        self.secret = random.Random(seed).choice(WORDS)
        self.lines: list[str] = []
        self.best_greens = 0
        self.done = False
        observation = f"Guess the 5-letter word. You have {self.max_guesses} guesses."
        return observation, {"state": self.state(), "progress": 0.0}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self.done:
            raise RuntimeError("wordle episode is over; call reset()")
        guess = action.strip().strip(string.punctuation + string.whitespace).lower()
        if not re.fullmatch(r"[a-z]{5}", guess):
            info = {"state": self.state(), "success": False, "invalid_action": True, "progress": self.best_greens / 5}
            return "Invalid action: reply with one 5-letter word.", 0.0, False, False, info
        marks = wordle_feedback(self.secret, guess)
        line = f"{guess} -> {marks}"
        self.lines.append(line)
        self.best_greens = max(self.best_greens, marks.count("G"))
        success = guess == self.secret
        terminated = success or len(self.lines) >= self.max_guesses
        self.done = terminated
        observation = line
        if terminated and not success:
            observation += f"\nNo guesses left; the word was {self.secret}."
        info = {"state": self.state(), "success": success, "invalid_action": False, "progress": self.best_greens / 5}
        return observation, float(success), terminated, False, info

    def state(self) -> str:
        return str(tuple(self.lines))
