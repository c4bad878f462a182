#!/bin/bash
# Reward 1 when sorted.txt holds the distinct numbers in numeric order.
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace || exit 0
expected=$'-12\n-3\n0\n3\n7\n9\n15\n42\n100'
got=$(tr -d ' \t' < sorted.txt 2>/dev/null | sed '/^$/d')
if [ "$got" = "$expected" ]; then
  echo 1 > /logs/verifier/reward.txt
fi
