#!/usr/bin/env bash
# Prints a folder of Vulkan headers new enough for this llama.cpp (>= 1.3.261: it uses
# VK_EXT_layer_settings). The system's headers when they are; otherwise Debian trixie's libvulkan-dev
# headers, downloaded once with a private apt state (the system's sources, lists and packages are
# left as they are) and unpacked into the cache. Nothing else from trixie is installed.
set -euo pipefail
NEED=261
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/edgellm/vulkan-headers

version() {  # the header version (1.3.NNN's NNN) of an include folder, or 0
  sed -n 's/^#define VK_HEADER_VERSION \([0-9]*\).*/\1/p' "$1/vulkan/vulkan_core.h" 2>/dev/null || echo 0
}

for dir in /usr/include "$CACHE/usr/include"; do
  v=$(version "$dir"); v=${v:-0}
  if [ -f "$dir/vulkan/vulkan_core.h" ] && { [ "$v" -ge "$NEED" ] || grep -q 'VK_API_VERSION_1_4' "$dir/vulkan/vulkan_core.h"; }; then
    echo "$dir"; exit 0
  fi
done

command -v apt-get >/dev/null || { echo "Vulkan headers >= 1.3.$NEED are needed: install the Vulkan SDK" >&2; exit 2; }
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
cat > "$work/trixie.sources" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
opts=(-o "Dir::Etc::SourceList=$work/trixie.sources" -o "Dir::Etc::SourceParts=/dev/null"
      -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o "APT::Sandbox::User=root")
apt-get "${opts[@]}" -qq update >&2
(cd "$work" && apt-get "${opts[@]}" -qq download libvulkan-dev >&2)
mkdir -p "$CACHE.tmp" && dpkg -x "$work"/libvulkan-dev_*.deb "$CACHE.tmp"
rm -rf "$CACHE" && mv "$CACHE.tmp" "$CACHE"
echo "$CACHE/usr/include"
