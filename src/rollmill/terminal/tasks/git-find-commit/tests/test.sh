#!/bin/bash
# Reward 1 when answer.txt holds the hash of the "Tune settings again" commit.
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace || exit 0
expected=$(git -C repo log --format=%H --grep='^Tune settings again$' 2>/dev/null)
[ ${#expected} = 40 ] || exit 0
if [ -f answer.txt ] && [ "$(tr -d ' \t\n' < answer.txt)" = "$expected" ]; then
  echo 1 > /logs/verifier/reward.txt
fi
