#!/bin/bash
# Reward 1 when server.ini equals the expected file (trailing whitespace ignored).
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace || exit 0
if [ -f server.ini ] && diff -q -b -B server.ini /tests/expected.ini > /dev/null; then
  echo 1 > /logs/verifier/reward.txt
fi
