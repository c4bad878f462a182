#!/bin/bash
# Reward 1 when /workspace/current is a symlink resolving to releases/v1.10.0.
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace || exit 0
if [ -L current ] && [ "$(readlink -f current)" = "/workspace/releases/v1.10.0" ]; then
  echo 1 > /logs/verifier/reward.txt
fi
