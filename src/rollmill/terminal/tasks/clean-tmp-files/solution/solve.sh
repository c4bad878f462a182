#!/bin/bash
find project -type f -name '*.tmp' -print0 | xargs -0 rm -f
