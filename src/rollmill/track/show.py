"""Readable text for dumped samples: RLVR completions, or agent episodes turn by turn."""

from __future__ import annotations


def format_samples(records: list[dict]) -> str:
    return "\n\n".join(_episode(r) if "turns" in r else _completion(r) for r in records)


def _completion(r: dict) -> str:
    return (f"--- step {r['step']}  reward {r['reward']:+.3f}  ({r.get('finish_reason', '')})\n"
            f"prompt:     {r['prompt']}\nanswer:     {r['answer']}\ncompletion: {r['completion']}")


def _episode(r: dict) -> str:
    head = (f"--- step {r['step']}  seed {r['seed']}  group {r['group']}  reward {r['reward']:+.3f}  "
            f"{'success' if r['success'] else 'no success'}  ({r['end_reason']})")
    lines = [head, f"start: {_indent(r['initial_observation'])}"]
    for k, t in enumerate(r["turns"]):
        flag = "  [invalid]" if t["invalid"] else ""
        lines.append(f"turn {k}: reply {t['reply']!r} -> action {t['action']!r}  reward {t['reward']:+.3f}{flag}")
        if t["observation"]:
            lines.append(f"        env: {_indent(t['observation'])}")
    if r.get("error"):
        lines.append(f"error: {r['error']}")
    lines.append("trained tokens are in [[ ]]:")
    lines.extend(f"  row {i}: {view!r}" for i, view in enumerate(r["trained_view"]))
    return "\n".join(lines)


def _indent(text: str) -> str:
    return text.replace("\n", "\n        ")
