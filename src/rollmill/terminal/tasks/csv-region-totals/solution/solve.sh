#!/bin/bash
{
  echo "region,total"
  tail -n +2 sales.csv | awk -F, '{sum[$1] += $3} END {for (r in sum) print r "," sum[r]}' | sort
} > totals.csv
