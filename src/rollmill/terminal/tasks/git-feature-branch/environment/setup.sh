#!/bin/bash
# Fixed dates make the commit hashes the same on every run.
set -e
git init -q -b main repo
cd repo
git config user.email "dev@example.com"
git config user.name "Dev"
commit() {  # commit FILE CONTENT MESSAGE DATE
  echo "$2" > "$1"
  git add "$1"
  GIT_AUTHOR_DATE="$4" GIT_COMMITTER_DATE="$4" git commit -q -m "$3"
}
commit README.md "# shop" "Initial commit" "2024-01-01T10:00:00Z"
commit app.py "print('shop')" "Add app" "2024-01-02T10:00:00Z"
