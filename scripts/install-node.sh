#!/usr/bin/env bash
# Installs a pinned Node.js and npm into target/node, for the TypeScript SDK
# (sdk/typescript) and its tests. Both come from the npm registry: Node.js as
# the `node-linux-<arch>` package (the official binary, repackaged), npm as
# the `npm` package (which bundles its own dependencies). Each tarball is
# checked against the integrity pinned below before anything is unpacked.
#
# Idempotent: a target/node that already holds these versions is kept as it
# is. Any npm already on the machine is used only to fetch the two tarballs;
# without one, Debian's `npm` package is installed to bootstrap (Debian 12's
# own Node.js 18 is too old for the SDK, which needs Node >= 20).
#
# Afterwards: `export PATH="$PWD/target/node/bin:$PATH"`.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST="${HF_NODE_DIR:-$ROOT/target/node}"

NODE_VERSION=22.23.5
NPM_VERSION=10.9.9
NPM_INTEGRITY=sha512-1g+6jLQvaIuB4zwvHL7yrXuXcWZwDsCtBX8bbWDqbvJSSr9nPiDDWTHNgwXR27iIcTTW7v3A57hDW9RYv2W4Yg==
case "$(uname -m)" in
    x86_64)
        ARCH=x64
        NODE_INTEGRITY=sha512-3jhC+wcoWxKZxcRqF2sUSl0c9HEXFnur/nuIPx6O6CWKV0jOUWQm7Htw5SuXqqlMCEhi0cJqybFPEb5hhcBiMw==
        ;;
    aarch64)
        ARCH=arm64
        NODE_INTEGRITY=sha512-e1LOUGKVruPGuLVutn8+Cgm5pI1APm4Kvh+zbb/qe/ZpD9s+TQby5iUgZOWmPpbSKpj0Td8DP1N0NEnXasHizg==
        ;;
    *)
        echo "install-node: no pinned Node.js for $(uname -m)" >&2
        exit 1
        ;;
esac

installed() {
    [ -x "$DEST/bin/node" ] && [ -x "$DEST/bin/npm" ] || return 1
    [ "$("$DEST/bin/node" --version 2>/dev/null)" = "v$NODE_VERSION" ] || return 1
    [ "$("$DEST/bin/npm" --version 2>/dev/null)" = "$NPM_VERSION" ] || return 1
}

if installed; then
    echo "install-node: Node.js $NODE_VERSION and npm $NPM_VERSION already in $DEST"
    exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
    echo "install-node: no npm to fetch with; installing Debian's npm to bootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends npm ca-certificates >/dev/null
fi
for tool in openssl tar base64; do
    command -v "$tool" >/dev/null || { echo "install-node: $tool is missing" >&2; exit 1; }
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp" "$DEST.new"' EXIT

fetch() { # name version integrity -> path of the checked tarball
    local name=$1 version=$2 want=$3 file got
    (cd "$tmp" && npm pack --silent "$name@$version" >/dev/null)
    file="$tmp/$name-$version.tgz"
    [ -f "$file" ] || { echo "install-node: npm pack made no $file" >&2; exit 1; }
    got="sha512-$(openssl dgst -sha512 -binary "$file" | base64 -w0)"
    if [ "$got" != "$want" ]; then
        echo "install-node: $name@$version has integrity $got, pinned $want" >&2
        exit 1
    fi
    echo "$file"
}

node_tgz=$(fetch "node-linux-$ARCH" "$NODE_VERSION" "$NODE_INTEGRITY")
npm_tgz=$(fetch npm "$NPM_VERSION" "$NPM_INTEGRITY")

rm -rf "$DEST.new"
mkdir -p "$DEST.new/lib/node_modules/npm"
tar -xzf "$node_tgz" -C "$DEST.new" --strip-components=1 --exclude=package/include
tar -xzf "$npm_tgz" -C "$DEST.new/lib/node_modules/npm" --strip-components=1
# npm and npx run on this node whatever else is on PATH.
for tool in npm npx; do
    cat >"$DEST.new/bin/$tool" <<EOF
#!/bin/sh
here=\$(dirname "\$(readlink -f "\$0")")
exec "\$here/node" "\$here/../lib/node_modules/npm/bin/$tool-cli.js" "\$@"
EOF
    chmod 0755 "$DEST.new/bin/$tool"
done
rm -rf "$DEST"
mv "$DEST.new" "$DEST"
installed || { echo "install-node: $DEST does not run after install" >&2; exit 1; }
echo "install-node: Node.js $NODE_VERSION and npm $NPM_VERSION installed in $DEST"
