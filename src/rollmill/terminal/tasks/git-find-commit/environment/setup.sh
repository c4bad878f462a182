#!/bin/bash
# Fixed dates make the commit hashes the same on every run. Several commits touch settings.py
# and the messages do not name the constant, so only the history's content gives the answer.
set -e
git init -q -b main repo
cd repo
git config user.email "dev@example.com"
git config user.name "Dev"
day=0
commit() {  # commit MESSAGE (stages everything)
  day=$((day + 1))
  git add -A
  GIT_AUTHOR_DATE="2024-02-0${day}T09:00:00Z" GIT_COMMITTER_DATE="2024-02-0${day}T09:00:00Z" git commit -q -m "$1"
}
printf 'NAME = "worker"\nTIMEOUT = 10\n' > settings.py
commit "Initial settings"
printf 'def run():\n    return 0\n' > worker.py
commit "Add worker"
printf 'NAME = "worker"\nTIMEOUT = 10\nMAX_RETRIES = 3\n' > settings.py
commit "Tune settings"
printf 'def run():\n    return 1\n' > worker.py
commit "Fix worker exit code"
printf 'NAME = "worker"\nTIMEOUT = 20\nMAX_RETRIES = 7\n' > settings.py
commit "Tune settings again"
printf 'NAME = "worker"\nTIMEOUT = 20\nMAX_RETRIES = 7\nVERBOSE = False\n' > settings.py
commit "Quieter logs"
echo "# worker" > README.md
commit "Add readme"
