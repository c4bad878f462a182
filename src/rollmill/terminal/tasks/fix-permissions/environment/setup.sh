#!/bin/bash
# File modes do not survive packaging, so the files are made here with known modes.
set -e
printf '#!/bin/bash\necho deploying\n' > deploy.sh
echo "k3y-0f-the-day" > secret.key
chmod 644 deploy.sh secret.key
