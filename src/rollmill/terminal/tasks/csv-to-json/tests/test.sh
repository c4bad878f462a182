#!/bin/bash
# Reward 1 when people.json parses to exactly the expected list of objects.
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace || exit 0
python3 - <<'PY' && echo 1 > /logs/verifier/reward.txt
import json
import sys

expected = [
    {"name": "Ada", "age": 36, "city": "London"},
    {"name": "Grace", "age": 45, "city": "New York"},
    {"name": "Linus", "age": 28, "city": "Helsinki"},
    {"name": "Tanaka, Yui", "age": 31, "city": "Osaka"},
]
try:
    got = json.load(open("people.json"))
except (OSError, ValueError):
    sys.exit(1)
# bool is an int subclass: `"age": true` must not pass as 1.
ok = got == expected and all(type(p["age"]) is int for p in got)
sys.exit(0 if ok else 1)
PY
