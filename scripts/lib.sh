# Shared helpers for the scripts in this folder. Sourced, not run.

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

# The machines this project targets ship a Rust toolchain (rustup) with rustfmt and clippy.
# Say clearly what is missing rather than failing somewhere deep in a build.
need_rust_toolchain() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "error: cargo is not on PATH. Install Rust (https://rustup.rs) and run this again." >&2
        exit 1
    fi
    for component in rustfmt clippy; do
        if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
            if command -v rustup >/dev/null 2>&1; then
                rustup component add "$component"
            else
                echo "error: cargo $component is missing and rustup is not available to add it." >&2
                exit 1
            fi
        fi
    done
}
