#!/usr/bin/env bash
# Installs the Debian packages the browser tests drive (Chromium and ChromeDriver) when they are
# missing and we are root with apt. Without them the browser tests skip and say why.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "note: chromium/chromium-driver missing and cannot be installed here (not root or no apt); browser tests will skip" >&2
  exit 0
fi
echo "installing chromium and chromium-driver (Debian) for the browser tests"
export DEBIAN_FRONTEND=noninteractive
# A mirror that is down must not fail the whole test run: the browser tests then skip and say why.
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }; then
  echo "warning: could not install chromium/chromium-driver; the browser tests will skip" >&2
fi
