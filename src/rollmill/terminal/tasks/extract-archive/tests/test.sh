#!/bin/bash
# Reward 1 when answer.txt holds the code stored in the archive.
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace || exit 0
if [ -f answer.txt ] && [ "$(tr -d ' \t\n' < answer.txt)" = "4721-ZEBRA" ]; then
  echo 1 > /logs/verifier/reward.txt
fi
