#!/bin/bash
# Fixed dates make the commit hashes the same on every run.
set -e
export GIT_AUTHOR_DATE="2024-01-01T10:00:00Z" GIT_COMMITTER_DATE="2024-01-01T10:00:00Z"
git init -q -b main repo
cd repo
git config user.email "dev@example.com"
git config user.name "Dev"
echo "# demo" > README.md
git add README.md
git commit -q -m "Initial commit"
