#!/bin/bash
# Reward 1 when project/{src,tests,docs} exist and README.md starts with "# project".
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace/project || exit 0
for d in src tests docs; do [ -d "$d" ] || exit 0; done
[ "$(head -n 1 README.md 2>/dev/null)" = "# project" ] || exit 0
echo 1 > /logs/verifier/reward.txt
