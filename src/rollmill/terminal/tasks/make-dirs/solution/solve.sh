#!/bin/bash
mkdir -p project/src project/tests project/docs
echo "# project" > project/README.md
