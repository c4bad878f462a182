#!/bin/bash
# Half a point for the right bundle, half for a checksum file that sha256sum -c accepts.
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace/dist || exit 0
expected=$'// header: shop bundle\nfunction price(n) { return n * 2; }\nconsole.log(price(21));'
[ -f bundle.js ] && [ "$(cat bundle.js)" = "$expected" ] || exit 0
if [ "$(awk '{print $2}' bundle.js.sha256 2>/dev/null)" = bundle.js ] && sha256sum -c --status bundle.js.sha256 2>/dev/null; then
  echo 1 > /logs/verifier/reward.txt
else
  echo 0.5 > /logs/verifier/reward.txt
fi
