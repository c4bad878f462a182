#!/bin/bash
# Runs the original test and some unseen cases against the agent's stats.py.
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace || exit 0
export PYTHONPATH=/workspace PYTHONDONTWRITEBYTECODE=1
if timeout 20 python3 /tests/test_stats.py && timeout 20 python3 /tests/test_hidden.py; then
  echo 1 > /logs/verifier/reward.txt
fi
