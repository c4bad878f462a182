#!/bin/bash
chmod 755 deploy.sh
chmod 600 secret.key
