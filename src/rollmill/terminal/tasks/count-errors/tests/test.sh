#!/bin/bash
# Reward 1 when error_count.txt holds the number of ERROR lines (7).
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace || exit 0
if [ -f error_count.txt ] && [ "$(tr -d ' \t\n' < error_count.txt)" = "7" ]; then
  echo 1 > /logs/verifier/reward.txt
fi
