#!/usr/bin/env bash
# Real-window end-to-end test of the desktop app (issue 7). Builds what it needs,
# then runs tests/e2e/run.mjs under Xvfb and a private D-Bus session.
#
#   tests/e2e/run.sh [scenario ...]      exit 0 only if every scenario passed
#   tests/e2e/run.sh --memory            print the app's RSS/PSS with one key listed, and
#                                        a bare Tauri 2 window's in the same run
#
# UKEY_E2E_PROFILE=release builds and tests the release binaries instead of debug.
#
# Needs (Debian): xvfb webkit2gtk-driver dbus fonts-noto-cjk softhsm2, the Tauri build
# packages (libwebkit2gtk-4.1-dev ...), Node 20 + npm. Installs tauri-driver with
# `cargo install` when it is missing. Screenshots land in tests/e2e/screenshots/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# The workspace's own target dir unless one is given: the same one every other step
# of `cargo xtask test` builds into.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
cd "$ROOT"

for tool in xvfb-run dbus-run-session WebKitWebDriver node npm; do
  if ! command -v "$tool" >/dev/null; then
    echo "e2e: missing $tool (apt-get install xvfb dbus webkit2gtk-driver nodejs npm)" >&2
    exit 2
  fi
done

TAURI_DRIVER_BIN="${TAURI_DRIVER_BIN:-$(command -v tauri-driver || true)}"
if [ -z "$TAURI_DRIVER_BIN" ] && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/tauri-driver" ]; then
  TAURI_DRIVER_BIN="${CARGO_HOME:-$HOME/.cargo}/bin/tauri-driver"
fi
if [ -z "$TAURI_DRIVER_BIN" ]; then
  echo "e2e: installing tauri-driver (cargo install tauri-driver --locked --version ^2)"
  cargo install tauri-driver --locked --version '^2'
  TAURI_DRIVER_BIN="$(command -v tauri-driver || echo "${CARGO_HOME:-$HOME/.cargo}/bin/tauri-driver")"
fi

echo "e2e: building the UI"
[ -d ui/node_modules ] || npm --prefix ui ci --no-audit --no-fund
npm --prefix ui run build
[ -d tests/e2e/node_modules ] || npm --prefix tests/e2e ci --no-audit --no-fund

echo "e2e: building the app, ukey, ukey-sim, the portal and the fixtures CLI"
PROFILE="${UKEY_E2E_PROFILE:-debug}"
case "$PROFILE" in
  debug) PROFILE_ARGS=() ;;
  release) PROFILE_ARGS=(--release) ;;
  *) echo "e2e: UKEY_E2E_PROFILE must be debug or release" >&2; exit 2 ;;
esac
cargo build "${PROFILE_ARGS[@]}" -p ukey-desktop
cargo build "${PROFILE_ARGS[@]}" -p ukey-sim -p ukey-portal -p softhsm-fixtures -p ukey-cli

BIN="$CARGO_TARGET_DIR/$PROFILE"
export UKEY_DESKTOP_BIN="$BIN/ukey-desktop"
export UKEY_SIM_BIN="$BIN/ukey-sim"
export UKEY_PORTAL_BIN="$BIN/ukey-portal"
export UKEY_CLI_BIN="$BIN/ukey"
export SOFTHSM_FIXTURES_BIN="$BIN/softhsm-fixtures"
export UKEY_SIM_MODULE_PATH="$BIN/libukey_sim.so"
export TAURI_DRIVER_BIN
for f in "$UKEY_DESKTOP_BIN" "$UKEY_CLI_BIN" "$UKEY_SIM_BIN" "$UKEY_PORTAL_BIN" "$SOFTHSM_FIXTURES_BIN" "$UKEY_SIM_MODULE_PATH"; do
  [ -e "$f" ] || { echo "e2e: $f was not built" >&2; exit 2; }
done
# Tokens on tmpfs when there is one: SoftHSM2 writes are much faster there.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then export E2E_TMP=/dev/shm; fi

if [ "${1:-}" = "--memory" ]; then
  cargo build "${PROFILE_ARGS[@]}" -p ukey-desktop --example bare_window
  export UKEY_BARE_WINDOW_BIN="$BIN/examples/bare_window"
  exec xvfb-run -a -s "-screen 0 1280x900x24" dbus-run-session -- node tests/e2e/memory.mjs
fi

echo "e2e: running under xvfb-run + dbus-run-session"
# -s: a screen big enough for the window; 24-bit so screenshots have real colours.
exec xvfb-run -a -s "-screen 0 1280x900x24" \
  dbus-run-session -- node tests/e2e/run.mjs "$@"
