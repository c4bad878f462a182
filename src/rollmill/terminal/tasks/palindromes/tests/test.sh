#!/bin/bash
# Reward 1 when palindromes.txt lists exactly the palindromes in their original order.
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace || exit 0
expected=$'level\nracecar\nnoon\nrefer\nstats\nrotor\nkayak\nmadam\ncivic\ntenet\na'
got=$(tr -d ' \t' < palindromes.txt 2>/dev/null | sed '/^$/d')
if [ "$got" = "$expected" ]; then
  echo 1 > /logs/verifier/reward.txt
fi
