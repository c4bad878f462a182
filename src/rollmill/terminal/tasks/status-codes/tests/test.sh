#!/bin/bash
# Reward 1 when status_counts.txt has the exact per-code counts in code order.
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace || exit 0
expected=$'200 30\n301 5\n404 8\n500 3'
got=$(tr -s ' \t' ' ' < status_counts.txt 2>/dev/null | sed 's/^ //; s/ $//' | sed '/^$/d')
if [ "$got" = "$expected" ]; then
  echo 1 > /logs/verifier/reward.txt
fi
