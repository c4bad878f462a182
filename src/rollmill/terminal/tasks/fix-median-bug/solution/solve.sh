#!/bin/bash
python3 - <<'PY'
from pathlib import Path

path = Path("stats.py")
path.write_text(path.read_text().replace(
    "    return ordered[middle]\n",
    "    if len(ordered) % 2:\n"
    "        return ordered[middle]\n"
    "    return (ordered[middle - 1] + ordered[middle]) / 2\n",
))
PY
python3 test_stats.py
