# Sourced by the download scripts: fetch URL DEST, skipping a file already
# there, through a .tmp name so an interrupted download is never taken as done.
fetch() {
    if [ -s "$2" ]; then echo "$2: already there, skipping download"; return; fi
    if command -v curl >/dev/null; then curl -fL --retry 3 -o "$2.tmp" "$1"
    elif command -v wget >/dev/null; then wget -q -O "$2.tmp" "$1"
    else echo "error: need curl or wget" >&2; exit 1; fi
    mv "$2.tmp" "$2"
}
