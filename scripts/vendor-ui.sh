#!/usr/bin/env bash
# vendor-ui.sh — fetches the web console's third-party files (xterm.js and its fit addon) from the
# npm registry at pinned versions, checks each tarball against its pinned sha512 integrity, and
# writes the files the console embeds, with their licenses, into
# crates/hyperfleet-core/ui/vendor/. The output is committed, so `cargo build` needs no network;
# run this only to change a version (then update the pins below and commit the result).
#
#   bash scripts/vendor-ui.sh           (re-fetch and rewrite)
#   bash scripts/vendor-ui.sh --check   (fetch and fail if the committed files differ)
#
# Uses `npm pack` when npm is installed (Debian's `npm` package), else curl on the registry's
# tarball URL; either way the integrity is checked here, against the pin.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=crates/hyperfleet-core/ui/vendor
CHECK=0
[ "${1:-}" = --check ] && CHECK=1

# name version integrity (as `npm view NAME@VERSION dist.integrity` prints it)
PINS=(
  "@xterm/xterm 6.0.0 sha512-TQwDdQGtwwDt+2cgKDLn0IRaSxYu1tSUjgKarSDkUM0ZNiSRXFpjxEsvc/Zgc5kq5omJ+V0a8/kIM2WD3sMOYg=="
  "@xterm/addon-fit 0.11.0 sha512-jYcgT6xtVYhnhgxh3QgYDnnNMYTcf8ElbxxFzX0IZo+vabQqSPAjC3c1wJrKB5E19VwQei89QCiZZP86DCPF7g=="
)

WORK=$(mktemp -d /tmp/hf-vendor-ui.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

fetch() { # name version -> path of the tarball
  local name=$1 version=$2 base tgz
  base=${name##*/}
  tgz="$WORK/${name//\//-}-$version.tgz"
  tgz=${tgz//@/}
  if command -v npm >/dev/null; then
    (cd "$WORK" && npm pack --silent "$name@$version" >/dev/null)
    tgz=$(ls "$WORK"/*"$base-$version.tgz")
  else
    curl -fsSL -o "$tgz" "https://registry.npmjs.org/$name/-/$base-$version.tgz"
  fi
  echo "$tgz"
}

STAGE="$WORK/out"
mkdir -p "$STAGE"
for pin in "${PINS[@]}"; do
  read -r name version integrity <<<"$pin"
  tgz=$(fetch "$name" "$version")
  got="sha512-$(openssl dgst -sha512 -binary "$tgz" | base64 -w0)"
  if [ "$got" != "$integrity" ]; then
    echo "vendor-ui: $name@$version: integrity mismatch: got $got, pinned $integrity" >&2
    exit 1
  fi
  dir="$WORK/${name##*/}"
  mkdir -p "$dir"
  tar -xzf "$tgz" -C "$dir"
  dest="$STAGE/${name##*/}"
  mkdir -p "$dest"
  cp "$dir/package/LICENSE" "$dest/LICENSE"
  case $name in
    @xterm/xterm)
      # The source map is not shipped: drop the comment that would make devtools ask for it.
      sed '/^\/\/# sourceMappingURL=/d' "$dir/package/lib/xterm.mjs" >"$dest/xterm.mjs"
      cp "$dir/package/css/xterm.css" "$dest/xterm.css"
      ;;
    @xterm/addon-fit)
      sed '/^\/\/# sourceMappingURL=/d' "$dir/package/lib/addon-fit.mjs" >"$dest/addon-fit.mjs"
      ;;
  esac
  echo "$name $version $integrity" >>"$STAGE/VERSIONS"
done

if [ $CHECK = 1 ]; then
  diff -r "$STAGE" "$OUT" && echo "vendor-ui: the committed files match the pins"
  exit
fi
rm -rf "$OUT"
mkdir -p "$(dirname "$OUT")"
cp -r "$STAGE" "$OUT"
echo "vendor-ui: wrote $OUT:"
find "$OUT" -type f | sort
