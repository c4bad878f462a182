#!/bin/bash
# The archive is built here and its sources deleted, so only extracting it reveals the code.
set -e
mkdir -p payload/config payload/data
echo "4721-ZEBRA" > payload/config/code.txt
seq 1 50 > payload/data/numbers.txt
tar -czf bundle.tar.gz payload
rm -rf payload
