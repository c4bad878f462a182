"""A tool-use env: answer an arithmetic question, optionally calling a calculator first.

The calculator parses expressions with `ast` and evaluates a small whitelist of nodes itself, so
model-written text can never run code.
"""

from __future__ import annotations

import ast
import json
import operator
import random
import re
from typing import Any

from rollmill.envs.base import register_env

BINARY_OPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
UNARY_OPS = {ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_EXPONENT = 10
MAX_MAGNITUDE = 10**100  # bounds the work any expression can cause (huge ints are slow to build and print)
MAX_LENGTH = 500
TOOLS = [  # the calculator's actions as OpenAI function schemas, for `native_tools`
    {"type": "function", "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression (numbers, + - * / // % ** and parentheses).",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "answer", "description": "Give the final answer; this ends the episode.",
        "parameters": {"type": "object", "properties": {"value": {"type": "number"}}, "required": ["value"]}}},
]
TEXT_CALL = re.compile(r"\s*(calculator|answer)\s*:\s*(.*?)\s*", re.IGNORECASE | re.DOTALL)


def safe_eval(expression: str) -> int | float:
    """Evaluate numbers, + - * / // % ** (exponent <= 10), unary +/- and parentheses; raise ValueError otherwise."""
    if len(expression) > MAX_LENGTH:
        raise ValueError(f"expression longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError("invalid syntax") from None
    return _eval(tree.body)


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = node.value
    elif isinstance(node, ast.UnaryOp) and type(node.op) in UNARY_OPS:
        value = UNARY_OPS[type(node.op)](_eval(node.operand))
    elif isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent {right} is larger than {MAX_EXPONENT}")
        try:
            value = BINARY_OPS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        except OverflowError:
            raise ValueError("number too large") from None
    else:
        raise ValueError(f"unsupported syntax: {type(node).__name__}")
    if isinstance(value, complex):  # a negative number to a fractional power
        raise ValueError("complex result")
    if abs(value) > MAX_MAGNITUDE:
        raise ValueError("number too large")
    return value


def format_number(value: int | float) -> str:
    """Integers without a trailing ".0", so results read like the question's numbers."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def parse_number(value: Any) -> int | float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value.strip())
            except ValueError:
                pass
    return None


def parse_call(text: str) -> tuple[str, Any] | None:
    """("calculator", expression) or ("answer", value) from JSON or `name: argument` text, else None."""
    text = text.strip()
    if text.startswith("{"):
        try:
            call = json.loads(text)
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict):
            return None
        arguments = call.get("arguments")
        if isinstance(arguments, str):  # OpenAI-style tool calls carry arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        name = str(call.get("name", "")).lower()
        if name == "calculator" and isinstance(arguments.get("expression"), str):
            return "calculator", arguments["expression"]
        if name == "answer" and "value" in arguments:
            return "answer", arguments["value"]
        return None
    match = TEXT_CALL.fullmatch(text)
    if match is None:
        return None
    return match.group(1).lower(), match.group(2)


@register_env("calculator", "answer an arithmetic question, with a calculator tool")
class CalculatorEnv:
    """Answer a generated arithmetic question; the agent may call a calculator tool before answering.

    Each reset seed draws `terms` numbers of `digits` digits joined by operators from `ops`. With
    max_calls set, calculator calls beyond it are refused (the episode goes on until an answer).
    With native_tools the env declares its actions as OpenAI tool schemas (`tools`), so the agent
    renders them with the model's chat template and parses the model's own tool-call format.
    """

    def __init__(self, digits: int = 2, terms: int = 3, ops: str = "+-*", max_calls: int | None = None,
                 native_tools: bool = False):
        if digits < 1 or terms < 1:
            raise ValueError(f"calculator needs digits >= 1 and terms >= 1, got digits={digits}, terms={terms}")
        if not ops or set(ops) - set("+-*/"):
            raise ValueError(f"calculator ops must be a non-empty string of + - * /, got {ops!r}")
        self.digits, self.terms, self.ops, self.max_calls = digits, terms, ops, max_calls
        self.instructions = (
            "Answer the arithmetic question. You may use a calculator first. Reply with exactly one tool call, "
            'either as JSON: {"name": "calculator", "arguments": {"expression": "37*48"}} or '
            '{"name": "answer", "arguments": {"value": 1776}}, or as text: calculator: 37*48 or answer: 1776. '
            "The calculator knows numbers, + - * / // % ** and parentheses. Your answer ends the episode."
        )
        if native_tools:
            self.tools = TOOLS
            self.instructions = ("Answer the arithmetic question. You may use the calculator tool first; "
                                 "then call the answer tool, which ends the episode.")
        self.done = True

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        rng = random.Random(seed)
        # Numbers have no leading zero and are never 0, so "/" cannot divide by zero.
        numbers = [str(rng.randint(10 ** (self.digits - 1), 10**self.digits - 1)) for _ in range(self.terms)]
        expression = numbers[0]
        for number in numbers[1:]:
            expression += f" {rng.choice(self.ops)} {number}"
        self.truth = safe_eval(expression)
        self.question = f"What is {expression}?"
        self.calls = 0
        self.done = False
        return self.question, {"state": self.state(), "progress": 0.0}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self.done:
            raise RuntimeError("calculator episode is over; call reset()")
        call = parse_call(action)
        value = parse_number(call[1]) if call is not None and call[0] == "answer" else None
        if call is None or (call[0] == "answer" and value is None):
            info = {"state": self.state(), "success": False, "invalid_action": True, "progress": 0.0}
            note = "Invalid action: reply with one tool call, e.g. calculator: 2+3 or answer: 5."
            return note, 0.0, False, False, info
        if call[0] == "answer":
            success = abs(value - self.truth) <= 1e-6
            self.done = True
            info = {"state": self.state(), "success": success, "invalid_action": False, "progress": float(success)}
            return ("correct" if success else "wrong"), float(success), True, False, info
        if self.max_calls is not None and self.calls >= self.max_calls:
            observation = "calculator error: no calls left; give your answer"
        else:
            self.calls += 1
            try:
                observation = f"calculator result: {format_number(safe_eval(call[1]))}"
            except ValueError as err:
                observation = f"calculator error: {err}"
        info = {"state": self.state(), "success": False, "invalid_action": False, "progress": 0.0}
        return observation, 0.0, False, False, info

    def state(self) -> str:
        return f"{self.question}|calls={self.calls}"
