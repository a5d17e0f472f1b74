#!/usr/bin/env bash
# Make a local stand-in for the Dockerfile's base image where no image registry is reachable:
# a Debian bookworm root filesystem from Debian's own mirror (debootstrap), imported into Docker,
# with Python 3.11 in a virtual environment first on PATH (so `pip install` and `python` behave as
# in the official python:3.11-slim image). Then build with:
#
#   docker build --network host --build-arg BASE_IMAGE=autellix-local/python:3.11-bookworm ...
#
# Needs root, debootstrap and a running Docker engine. Idempotent: an existing image is kept.
set -euo pipefail
image=${1:-autellix-local/python:3.11-bookworm}
if docker image inspect "$image" >/dev/null 2>&1; then
    echo "$image exists"; exit 0
fi
rootfs=${ROOTFS:-/var/tmp/autellix-bookworm-rootfs}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if [ ! -x "$rootfs/usr/bin/python3" ]; then
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$rootfs" "$mirror"
fi
# pip in the image trusts what this machine's pip trusts (a proxy's CA, say): the host's CA bundle
cert=${PIP_CERT:-$(pip config get global.cert 2>/dev/null || echo /etc/ssl/certs/ca-certificates.crt)}
install -D -m 0644 "$cert" "$rootfs/etc/ssl/certs/ca-certificates.crt"
tar -C "$rootfs" -c . | docker import - autellix-local/bookworm-rootfs:latest
docker build -t "$image" - <<'DOCKERFILE'
FROM autellix-local/bookworm-rootfs:latest
RUN python3 -m venv /opt/python && rm -rf /var/lib/apt/lists/* /var/cache/apt/*
ENV PATH=/opt/python/bin:$PATH LANG=C.UTF-8 PIP_CERT=/etc/ssl/certs/ca-certificates.crt
CMD ["python"]
DOCKERFILE
echo "built $image"
