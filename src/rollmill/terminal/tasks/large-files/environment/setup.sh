#!/bin/bash
# Sizes straddle the 10240-byte threshold on both sides, including exactly 10240.
set -e
make_file() { mkdir -p "$(dirname "$1")"; head -c "$2" /dev/zero | tr '\0' 'x' > "$1"; }
make_file data/readme.txt 300
make_file data/images/logo.png 20480
make_file data/images/icon.png 10240
make_file data/images/banner.png 10241
make_file data/cache/a.bin 9000
make_file data/cache/b.bin 65536
make_file data/cache/nested/deep/c.bin 12000
make_file data/logs/app.log 10000
make_file "data/logs/old run.log" 50000
