#!/usr/bin/env bash
# Render a demo report in headless Chromium and save a screenshot, to look at it as a reader would.
#   scripts/check_report.sh [demo-out/report.html] [demo-out/report.png]
# Needs Debian's chromium (apt-get install chromium); nothing is fetched from the network.
set -euo pipefail
report=$(realpath "${1:-demo-out/report.html}")
shot=$(realpath -m "${2:-${report%.html}.png}")
[ -f "$report" ] || { echo "no report at $report (run: make demo)" >&2; exit 2; }
browser=$(command -v chromium || command -v chromium-browser || true)
[ -n "$browser" ] || { echo "chromium not found: apt-get install chromium" >&2; exit 2; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
  --window-size=1200,3000 --screenshot="$shot" "file://$report" >/dev/null 2>&1
[ -s "$shot" ] || { echo "chromium wrote no screenshot" >&2; exit 1; }
# A rendered report is not a blank page: text in the top band, and the embedded plots bring many colours.
python=$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )
"$python" - "$shot" <<'PY'
import sys
from PIL import Image
image = Image.open(sys.argv[1]).convert("RGB")
width, height = image.size
top = image.crop((0, 0, width, 200)).getcolors(1 << 24)
colours = image.getcolors(1 << 24)
if len(top) < 2:
    sys.exit("the top of the page is blank: the report did not render")
if len(colours) < 200:
    sys.exit(f"only {len(colours)} colours on the page: the embedded plots did not render")
print(f"rendered: {width}x{height} px, {len(colours)} colours")
PY
echo "screenshot: $shot"
