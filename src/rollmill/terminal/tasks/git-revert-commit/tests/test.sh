#!/bin/bash
# Reward 1 when a new commit on top of "Tune timeouts" restores the tree of "Add readme".
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace/repo || exit 0
[ "$(git log --format=%s HEAD~1 2>/dev/null | head -n 3 | paste -sd,)" = "Tune timeouts,Add readme,Add config" ] || exit 0
[ "$(git rev-parse HEAD^{tree} 2>/dev/null)" = "$(git rev-parse HEAD~2^{tree} 2>/dev/null)" ] || exit 0
[ -z "$(git status --porcelain 2>/dev/null)" ] || exit 0
echo 1 > /logs/verifier/reward.txt
