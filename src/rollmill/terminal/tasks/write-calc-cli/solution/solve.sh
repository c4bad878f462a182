#!/bin/bash
cat > calc.py <<'PY'
import sys

OPS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b}


def main():
    op, a, b = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if op not in OPS:
        print(f"unknown operation: {op}", file=sys.stderr)
        sys.exit(2)
    print(OPS[op](a, b))


if __name__ == "__main__":
    main()
PY
