#!/bin/bash
set -e
mkdir -p project/src/util project/build/obj "project/my docs"
for f in src/main.py src/util/strings.py build/obj/main.o "my docs/notes.md" README.md src/tmp.py; do
  echo "keep $f" > "project/$f"
done
for f in src/main.py.tmp src/util/.cache.tmp build/obj/x.tmp "my docs/draft 1.tmp" session.tmp; do
  echo "junk $f" > "project/$f"
done
