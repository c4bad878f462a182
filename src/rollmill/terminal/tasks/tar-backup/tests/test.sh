#!/bin/bash
# Reward 1 when backup.tar.gz is a gzip tar whose files are exactly docs/ with the original content.
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace || exit 0
gzip -t backup.tar.gz 2>/dev/null || exit 0
files=$(tar -tzf backup.tar.gz 2>/dev/null | sed 's|^\./||' | grep -v '/$' | sort)
[ "$files" = $'docs/api/index.md\ndocs/api/items.md\ndocs/guide.md' ] || exit 0
out=$(mktemp -d) || exit 0
tar -xzf backup.tar.gz -C "$out" 2>/dev/null || exit 0
[ "$(cat "$out/docs/guide.md")" = "# Guide" ] || exit 0
[ "$(cat "$out/docs/api/index.md")" = "# API index" ] || exit 0
[ "$(cat "$out/docs/api/items.md")" = "GET /items" ] || exit 0
echo 1 > /logs/verifier/reward.txt
