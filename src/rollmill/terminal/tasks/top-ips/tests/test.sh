#!/bin/bash
# Reward 1 when top_ips.txt lists exactly the three most frequent IPs in order.
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace || exit 0
expected=$'10.0.0.5\n192.168.1.20\n172.16.0.3'
if [ -f top_ips.txt ] && [ "$(sed 's/[[:space:]]*$//' top_ips.txt | sed '/^$/d')" = "$expected" ]; then
  echo 1 > /logs/verifier/reward.txt
fi
