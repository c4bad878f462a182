#!/bin/bash
# Reward 1 when no *.tmp file is left and every other file is intact.
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace/project || exit 0
[ -z "$(find . -name '*.tmp')" ] || exit 0
for f in src/main.py src/util/strings.py build/obj/main.o "my docs/notes.md" README.md src/tmp.py; do
  [ "$(cat "$f" 2>/dev/null)" = "keep $f" ] || exit 0
done
echo 1 > /logs/verifier/reward.txt
