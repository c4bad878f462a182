#!/bin/bash
# Checks the fixed script on the sample and on an unseen file (case folding and tie order).
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace || exit 0
export PYTHONDONTWRITEBYTECODE=1
sample=$(timeout 20 python3 wordfreq.py sample.txt 3 2>/dev/null) || exit 0
hidden=$(timeout 20 python3 wordfreq.py /tests/hidden.txt 4 2>/dev/null) || exit 0
if [ "$sample" = $'the 5\na 2\ncat 2' ] && [ "$hidden" = $'banana 3\napple 2\ncherry 2\nzebra 2' ]; then
  echo 1 > /logs/verifier/reward.txt
fi
