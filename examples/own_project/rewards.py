"""Rewards of this example project, named in ../own_project.yaml as `examples/own_project/rewards.py:NAME`.

`right_amount` takes the batch the way TRL calls reward functions; the data's extra `unit` column
arrives as a list beside the answers. `short` takes one sample, rollmill's own form.
"""

import re


def right_amount(prompts, completions, answer, unit, **columns):
    """1.0 when the reply states the answer with its unit ("3000 m"), 0.5 for the number alone."""
    scores = []
    for completion, expected, expected_unit in zip(completions, answer, unit):
        numbers = re.findall(r"-?\d+(?:\.\d+)?", completion)
        if expected not in numbers:
            scores.append(0.0)
        else:
            scores.append(1.0 if re.search(rf"{re.escape(expected)}\s*{re.escape(expected_unit)}\b", completion) else 0.5)
    return scores


def short(completion, example, limit=40):
    """A small bonus for replies of at most `limit` characters."""
    return 1.0 if len(completion.strip()) <= limit else 0.0
