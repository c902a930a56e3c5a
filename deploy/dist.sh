#!/usr/bin/env bash
# Builds what ships, from one static binary (README, "Install"):
#   deploy/dist.sh binary       target/x86_64-unknown-linux-gnu/dist/imapgate: release, stripped,
#                               glibc linked statically (+crt-static; no musl target needed)
#   deploy/dist.sh deb          the binary, its man pages and shell completions (`imapgate
#                               generate`), then target/debian/imapgate_<version>-1_amd64.deb
#                               with cargo-deb (cargo install cargo-deb)
#   deploy/dist.sh image [TAG]  the binary, then the container image (default tag
#                               imapgate:<version>) with podman, or CONTAINER_TOOL=docker
# Several at once: deploy/dist.sh deb image. The binary is built once either way.
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-gnu
target_dir="${CARGO_TARGET_DIR:-target}"
out="$target_dir/$target/dist"

binary() {
    # --target keeps the static flag off build scripts and proc macros, which must stay dynamic.
    RUSTFLAGS='-C target-feature=+crt-static' \
        cargo build --profile dist --target "$target" --bin imapgate
}

# "imapgate 0.1.0 (revision 0123456789ab)": the labels say what the binary says.
version() { "$out/imapgate" --version | awk '{print $2}'; }
revision() { "$out/imapgate" --version | sed -n 's/.*(revision \(.*\))$/\1/p'; }

deb() {
    rm -rf "$out/assets"
    "$out/imapgate" generate "$out/assets"
    gzip -9nf "$out"/assets/man/*.1
    cargo deb --no-build --profile dist --target "$target"
}

image() {
    local tag="${1:-imapgate:$(version)}"
    # The context: the binary and the image's /etc, nothing else.
    local context="$out/image-context"
    rm -rf "$context"
    mkdir -p "$context"
    cp "$out/imapgate" "$context/"
    cp -r deploy/container/rootfs "$context/"
    "${CONTAINER_TOOL:-podman}" build -f deploy/container/Containerfile -t "$tag" \
        --build-arg VERSION="$(version)" --build-arg REVISION="$(revision)" "$context"
}

[ "$#" -gt 0 ] || { sed -n '2,10p' "$0"; exit 64; }
binary
while [ "$#" -gt 0 ]; do
    case "$1" in
        binary) shift ;;
        deb) deb; shift ;;
        image)
            if [ "$#" -gt 1 ] && [[ "$2" != binary && "$2" != deb && "$2" != image ]]; then
                image "$2"; shift 2
            else
                image; shift
            fi ;;
        *) echo "unknown step: $1" >&2; exit 64 ;;
    esac
done
