#!/usr/bin/env bash
# The playground's browser tests drive Debian's chromium through chromium-driver; pip cannot provide a browser, so
# `make test` installs them here when missing (as root, or with sudo), with fonts-wqy-zenhei so that screenshots
# show Chinese prompts (chromium has no CJK font of its own). Nothing is downloaded outside Debian's packages.
set -euo pipefail
BROWSER_PACKAGES=(chromium chromium-driver fonts-wqy-zenhei)
if command -v chromium >/dev/null && command -v chromedriver >/dev/null && dpkg -s fonts-wqy-zenhei >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${BROWSER_PACKAGES[@]}"
