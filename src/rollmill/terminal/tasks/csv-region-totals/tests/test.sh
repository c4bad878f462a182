#!/bin/bash
# Reward 1 when totals.csv has the header and the per-region sums in alphabetical order.
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace || exit 0
expected=$'region,total\neast,200\nnorth,160\nsouth,135\nwest,300'
got=$(tr -d ' \r' < totals.csv 2>/dev/null | sed '/^$/d')
if [ "$got" = "$expected" ]; then
  echo 1 > /logs/verifier/reward.txt
fi
