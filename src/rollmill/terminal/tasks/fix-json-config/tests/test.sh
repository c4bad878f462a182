#!/bin/bash
# Reward 1 when settings.json parses and holds the original values with retries = 5.
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace || exit 0
python3 - <<'PY' && echo 1 > /logs/verifier/reward.txt
import json
import sys

expected = {
    "service": "billing",
    "retries": 5,
    "endpoints": ["https://a.internal", "https://b.internal"],
    "timeouts": {"connect": 2, "read": 10},
    "verbose": False,
}
try:
    got = json.load(open("settings.json"))
except (OSError, ValueError):
    sys.exit(1)
sys.exit(0 if got == expected and type(got["retries"]) is int else 1)
PY
