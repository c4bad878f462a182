#!/bin/bash
# Reward 1 when /workspace/hello.txt holds exactly the line "hello".
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace || exit 0
if [ -f hello.txt ] && [ "$(cat hello.txt)" = "hello" ]; then
  echo 1 > /logs/verifier/reward.txt
fi
