#!/bin/bash
# Reward 1 when every photo is renamed to .jpg with its content intact and notes.txt is untouched.
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace/photos || exit 0
for p in beach city forest; do
  [ "$(cat "$p.jpg" 2>/dev/null)" = "fake image data: $p" ] || exit 0
done
[ -z "$(find . -name '*.jpeg')" ] || exit 0
[ "$(cat notes.txt 2>/dev/null)" = "shot list for the trip" ] || exit 0
echo 1 > /logs/verifier/reward.txt
