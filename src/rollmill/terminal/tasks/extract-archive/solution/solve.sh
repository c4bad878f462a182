#!/bin/bash
tar -xzf bundle.tar.gz
find . -name code.txt -exec cat {} \; > answer.txt
