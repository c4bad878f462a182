#!/bin/bash
git -C repo log --format=%H -S 'MAX_RETRIES = 7' --reverse -- settings.py | head -n 1 > answer.txt
