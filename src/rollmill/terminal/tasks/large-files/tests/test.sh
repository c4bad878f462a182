#!/bin/bash
# Reward 1 when large_files.txt lists exactly the files over 10240 bytes, sorted.
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace || exit 0
expected=$'data/cache/b.bin\ndata/cache/nested/deep/c.bin\ndata/images/banner.png\ndata/images/logo.png\ndata/logs/old run.log'
got=$(sed 's|^\./||; s/[[:space:]]*$//' large_files.txt 2>/dev/null | sed '/^$/d')
if [ "$got" = "$expected" ]; then
  echo 1 > /logs/verifier/reward.txt
fi
