#!/bin/bash
# Half a point for each file with the requested mode.
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace || exit 0
score=0
[ "$(stat -c %a deploy.sh 2>/dev/null)" = "755" ] && score=$((score + 1))
[ "$(stat -c %a secret.key 2>/dev/null)" = "600" ] && score=$((score + 1))
case $score in
  2) echo 1 > /logs/verifier/reward.txt ;;
  1) echo 0.5 > /logs/verifier/reward.txt ;;
esac
