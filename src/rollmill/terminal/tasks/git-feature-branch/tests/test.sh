#!/bin/bash
# Reward 1 when feature/login is main plus one commit adding login.txt, and main is untouched.
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace/repo || exit 0
main_before=$'Add app\nInitial commit'
[ "$(git log --format=%s main 2>/dev/null)" = "$main_before" ] || exit 0
git cat-file -e main:login.txt 2>/dev/null && exit 0
[ "$(git show feature/login:login.txt 2>/dev/null)" = "login page" ] || exit 0
[ "$(git rev-parse feature/login~1 2>/dev/null)" = "$(git rev-parse main)" ] || exit 0
echo 1 > /logs/verifier/reward.txt
