#!/bin/bash
# Reward 1 when active_users.txt lists exactly the active users, sorted.
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace || exit 0
expected=$'alice\ncarol\ndave\ntrent'
got=$(sed 's/[[:space:]]*$//' active_users.txt 2>/dev/null | sed '/^$/d')
if [ "$got" = "$expected" ]; then
  echo 1 > /logs/verifier/reward.txt
fi
