#!/bin/bash
# Reward 1 when reversed.txt is input.txt with its line order reversed.
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace || exit 0
expected=$'last line\nfifth line after a blank\n\nthird line\nsecond line\nfirst line'
if [ -f reversed.txt ] && [ "$(cat reversed.txt)" = "$expected" ]; then
  echo 1 > /logs/verifier/reward.txt
fi
