#!/bin/bash
# Created out of version order, so neither `ls` nor `ls -t` gives the answer.
set -e
for v in v1.2.0 v1.10.0 v1.9.3 v0.12.1; do
  mkdir -p "releases/$v"
  echo "$v" > "releases/$v/VERSION"
done
