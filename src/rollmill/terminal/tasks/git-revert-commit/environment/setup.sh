#!/bin/bash
# Fixed dates make the commit hashes the same on every run.
set -e
git init -q -b main repo
cd repo
git config user.email "dev@example.com"
git config user.name "Dev"
commit() {  # commit MESSAGE DATE (stages everything)
  git add -A
  GIT_AUTHOR_DATE="$2" GIT_COMMITTER_DATE="$2" git commit -q -m "$1"
}
printf 'name = api\ntimeout = 30\nretries = 3\n' > config.txt
commit "Add config" "2024-01-01T10:00:00Z"
echo "Service configuration lives in config.txt." > README.md
commit "Add readme" "2024-01-02T10:00:00Z"
printf 'name = api\ntimeout = 5\nretries = 0\n' > config.txt
echo "tmp" > debug.flag
commit "Tune timeouts" "2024-01-03T10:00:00Z"
