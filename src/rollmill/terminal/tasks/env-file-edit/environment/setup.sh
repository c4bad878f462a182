#!/bin/bash
# Written here rather than shipped: package-data globs skip dotfiles such as .env.
set -e
cat > .env <<'ENV'
# service settings
APP_NAME=inventory
LOG_LEVEL=info
LEGACY_MODE=1
DB_HOST=localhost
DB_PORT=5432
ENV
