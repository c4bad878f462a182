#!/bin/bash
sed -i 's/^LOG_LEVEL=.*/LOG_LEVEL=debug/; /^LEGACY_MODE=/d' .env
echo "API_URL=http://localhost:8000" >> .env
