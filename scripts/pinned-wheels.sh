# Sourced by scripts/libtorch.sh and scripts/cuda-headers.sh, which set
# WHEELS_PINNED ("name==version sha256:HEX" each), PLATFORMS, CACHE_ROOT and
# PREFIX, and define `fail MESSAGE` and `unpack STAGING WHEELS`.

# install_once NAME WHAT SIZE: unless $PREFIX/.complete is there, fetches the
# pinned wheels into $CACHE_ROOT/wheels and unpacks them (the caller's
# `unpack`) into a temporary folder .NAME.partial.* that becomes $PREFIX by
# one rename, `.complete` included. Serialised by a lock on the cache, so
# several processes may start it at once; a temporary folder left by an
# interrupted install is removed first. WHAT and SIZE go in the messages.
install_once() {
    local name=$1 what=$2 size=$3 python wheels staging
    [ -f "$PREFIX/.complete" ] && return 0
    mkdir -p "$CACHE_ROOT"
    exec 9>"$CACHE_ROOT/.$name.lock"
    if ! flock -n 9; then
        echo "waiting for another install of $what into $CACHE_ROOT" >&2
        flock 9
    fi
    # Another process may have finished the install while this one waited.
    if [ ! -f "$PREFIX/.complete" ]; then
        echo "installing $what into $PREFIX (once, $size)" >&2
        rm -rf "$CACHE_ROOT/.$name.partial."*
        python=${PYTHON:-$(command -v python3 || command -v python || true)}
        [ -n "$python" ] || fail "no python3 on PATH (it runs pip to fetch the wheels)"
        wheels=$CACHE_ROOT/wheels
        fetch_pinned_wheels "$wheels"
        staging=$(mktemp -d "$CACHE_ROOT/.$name.partial.XXXXXX")
        chmod 755 "$staging"
        unpack "$staging" "$wheels" ||
            { rm -rf "$staging"; fail "unpacking $what into $staging failed (see the line above)"; }
        rm -rf "$PREFIX"
        mv "$staging" "$PREFIX"
    fi
    exec 9>&-
}

# Fetches every wheel of WHEELS_PINNED for PLATFORMS into the folder $1,
# with install_once's `python`.
fetch_pinned_wheels() {
    local wheels=$1 requirement spec hash log
    mkdir -p "$wheels"
    log=$(mktemp)
    for requirement in "${WHEELS_PINNED[@]}"; do
        spec=${requirement% *}
        hash=${requirement#* }
        # pip checks the hash of a wheel it downloads; one already in the
        # cache is checked here, and fetched again when it does not match.
        if ! "$python" - "$wheels" "$spec" "$hash" <<'PY'; then
import hashlib, pathlib, sys
folder, spec, expected = sys.argv[1], sys.argv[2], sys.argv[3].split(":", 1)[1]
name, version = spec.split("==")
for wheel in pathlib.Path(folder).glob(f"{name.replace('-', '_')}-{version}-*.whl"):
    digest = hashlib.sha256()
    with wheel.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() == expected:
        sys.exit(0)
    wheel.unlink()
sys.exit(1)
PY
            echo "fetching $spec" >&2
            printf '%s --hash=%s\n' "$spec" "$hash" >"$log.req"
            if ! "$python" -m pip download --quiet --no-deps --only-binary=:all: \
                --require-hashes --python-version 3.11 --implementation cp --abi cp311 \
                "${PLATFORMS[@]/#/--platform=}" -d "$wheels" -r "$log.req" >"$log" 2>&1; then
                fail "downloading $spec failed: $(grep -m1 -E 'ERROR|Error|error' "$log" || tail -n1 "$log")"
            fi
        fi
    done
    rm -f "$log" "$log.req"
}
