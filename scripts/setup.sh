#!/usr/bin/env bash
# Installs everything the project needs on a Debian 12 machine, idempotently:
#   - Debian packages: the BPF toolchain (Debian's Rust 1.96 with its library source and
#     clippy, LLVM 22)
#     and the lab's and the bench's tools (iproute2, ethtool, curl, ncat, bpftool, wrk, iperf3,
#     and a font for the bench's plot, ...);
#   - bpf-linker 0.13 built against LLVM 22;
#   - kubernetes-validate (PyPI), which CI uses to check the deploy/ manifests;
#   - a BPF filesystem on /sys/fs/bpf.
# With LB_SETUP_IMAGE=1 (building the container image) only the build toolchain is installed.
# `scripts/setup.sh --check` only reports whether anything is missing (exit 1 if so).
set -euo pipefail

PACKAGES=(
  rustc-web cargo-web rust-web-src rust-web-clippy llvm-22-dev libpolly-22-dev libzstd-dev
  zlib1g-dev
  iproute2 ethtool curl ncat bpftool tcpdump util-linux procps iptables nftables iperf3 wrk
  fonts-dejavu-core
)
BPF_LINKER_VERSION=0.13.0
KUBERNETES_VALIDATE_VERSION=1.37.0

missing_packages() {
  local p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || echo "$p"
  done
}

bpf_linker_ok() {
  command -v bpf-linker >/dev/null 2>&1 && bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"
}

bpffs_ok() {
  [ -n "${LB_SETUP_IMAGE:-}" ] || [ "$(stat -f -c %T /sys/fs/bpf 2>/dev/null)" = "bpf_fs" ]
}

validator_ok() {
  [ -n "${LB_SETUP_IMAGE:-}" ] && return 0
  python3 -m kubernetes_validate --version 2>/dev/null | grep -q "$KUBERNETES_VALIDATE_VERSION"
}

export PATH="$HOME/.cargo/bin:$PATH"
# The machine's Python (with pip) comes through pyenv where there is one.
if [ -d "$HOME/.pyenv/shims" ]; then export PATH="$HOME/.pyenv/shims:$PATH"; fi

if [ "${1:-}" = "--check" ]; then
  ok=0
  m=$(missing_packages)
  [ -z "$m" ] || { echo "missing packages:" $m; ok=1; }
  bpf_linker_ok || { echo "missing: bpf-linker $BPF_LINKER_VERSION"; ok=1; }
  bpffs_ok || { echo "missing: bpffs on /sys/fs/bpf"; ok=1; }
  validator_ok || { echo "missing: kubernetes-validate $KUBERNETES_VALIDATE_VERSION"; ok=1; }
  command -v cargo >/dev/null 2>&1 || { echo "missing: cargo (rustup stable)"; ok=1; }
  exit $ok
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (it installs packages and mounts bpffs)" >&2
  exit 1
fi

m=$(missing_packages)
if [ -n "$m" ]; then
  echo "==> installing Debian packages:" $m
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $m
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup.sh: cargo (the rustup stable toolchain) is missing; this machine image should have it" >&2
  exit 1
fi

if ! bpf_linker_ok; then
  echo "==> building bpf-linker $BPF_LINKER_VERSION against LLVM 22"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version "$BPF_LINKER_VERSION" \
    --locked --no-default-features --features llvm-22
fi

if ! validator_ok; then
  echo "==> installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION"
  python3 -m pip install -q "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  hash -r
fi

if ! bpffs_ok; then
  echo "==> mounting bpffs on /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi

echo "==> setup complete"
