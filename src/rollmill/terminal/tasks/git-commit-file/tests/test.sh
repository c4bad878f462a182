#!/bin/bash
# Reward 1 when HEAD is "Add notes" on main, adds notes.txt, and the tree is clean.
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace/repo || exit 0
[ "$(git log -1 --format=%s 2>/dev/null)" = "Add notes" ] || exit 0
[ "$(git show HEAD:notes.txt 2>/dev/null)" = "first note" ] || exit 0
[ "$(git rev-list --count HEAD 2>/dev/null)" = 2 ] || exit 0
[ "$(git symbolic-ref --short HEAD 2>/dev/null)" = main ] || exit 0
[ -z "$(git status --porcelain 2>/dev/null)" ] || exit 0
echo 1 > /logs/verifier/reward.txt
