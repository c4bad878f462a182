#!/bin/bash
# Reward 1 when calc.py gives the right results and rejects an unknown operation with exit code 2.
mkdir -p /logs/verifier
echo 0 > /logs/verifier/reward.txt
cd /workspace || exit 0
[ -f calc.py ] || exit 0
export PYTHONDONTWRITEBYTECODE=1
check() {  # check EXPECTED OP A B
  [ "$(timeout 10 python3 calc.py "$2" "$3" "$4" 2>/dev/null)" = "$1" ]
}
check 7 add 3 4 && check -3 sub 2 5 && check 42 mul -6 -7 && check 0 mul 0 123 \
  && check 1000000000000 mul 1000000 1000000 && check -10 add -4 -6 || exit 0
out=$(timeout 10 python3 calc.py pow 2 3 2>/tmp/calc_err)
code=$?
if [ "$code" = 2 ] && [ -z "$out" ] && [ -s /tmp/calc_err ]; then
  echo 1 > /logs/verifier/reward.txt
fi
