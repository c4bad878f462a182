#!/bin/bash
grep -o '[0-9][0-9]*' report.txt | awk '{s += $1} END {print s}' > sum.txt
