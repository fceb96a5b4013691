# Sourced by scripts/libtorch.sh and scripts/cuda-headers.sh. Fetches every
# wheel of the caller's WHEELS_PINNED ("name==version sha256:HEX") for its
# PLATFORMS into the folder $1, with the caller's `python` and `fail`.
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
