#!/bin/bash
set -e
mkdir -p docs/api src
echo "# Guide" > docs/guide.md
echo "# API index" > docs/api/index.md
echo "GET /items" > docs/api/items.md
echo "print('not docs')" > src/main.py
