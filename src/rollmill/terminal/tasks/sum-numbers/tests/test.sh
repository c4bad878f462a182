#!/bin/bash
# Reward 1 when sum.txt holds the sum of every digit run in report.txt.
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace || exit 0
if [ -f sum.txt ] && [ "$(tr -d ' \t\n' < sum.txt)" = "3403" ]; then
  echo 1 > /logs/verifier/reward.txt
fi
