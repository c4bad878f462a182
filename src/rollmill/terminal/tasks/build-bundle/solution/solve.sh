#!/bin/bash
mkdir -p dist
while read -r name; do cat "src/$name"; done < src/manifest.txt > dist/bundle.js
cd dist && sha256sum bundle.js > bundle.js.sha256
