#!/bin/bash
# Only lines inside [server] (up to the next section header) are changed.
sed -i '/^\[server\]/,/^\[/ { s/^port = .*/port = 9090/; s/^debug = .*/debug = false/ }' server.ini
