"""A plotly HTML file opened in a real headless browser (Debian's chromium, docs/testing.md):
what it rendered, read back from the page itself.

`probe(path)` copies the page with a small script in its <head> that records uncaught errors
and console.error calls, waits for the page to load and plotly to draw, and then writes, into
the DOM, every plot's rendered traces (type, name, number of points, or of lines for parallel
coordinates) and what it drew (SVG layers, WebGL canvases). chromium's `--dump-dom` prints that
DOM; the test reads the JSON back. `None` where no chromium is installed (the caller skips).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

PROBE = """<script>
window.__errors = [];
window.addEventListener('error', function (e) { window.__errors.push(String(e.message)); });
(function () { var orig = console.error; console.error = function () {
  window.__errors.push(Array.prototype.join.call(arguments, ' ')); return orig.apply(console, arguments); }; })();
window.addEventListener('load', function () {
  setTimeout(function () {
    var out = {errors: window.__errors, plots: [], text: document.body.innerText.slice(0, 2000)};
    document.querySelectorAll('.js-plotly-plot').forEach(function (gd) {
      var traces = (gd._fullData || []).map(function (t) {
        var n = t.type === 'parcoords' ? (t.dimensions && t.dimensions[0] ? t.dimensions[0].values.length : 0)
                                      : (t.x ? t.x.length : 0);
        return {type: t.type, name: t.name || '', n: n};
      });
      out.plots.push({traces: traces, svg: gd.querySelectorAll('.main-svg').length,
                      canvases: gd.querySelectorAll('canvas').length});
    });
    var pre = document.createElement('pre'); pre.id = 'brsearch-probe';
    pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
  }, 1000);
});
</script>"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def probe(path: Path, timeout: float = 120) -> dict[str, Any] | None:
    exe = chromium()
    if exe is None:
        return None
    with tempfile.TemporaryDirectory(prefix="brsearch-browser-") as d:
        page = Path(d) / "page.html"
        page.write_text(Path(path).read_text().replace("<head>", "<head>" + PROBE, 1))
        proc = subprocess.run(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
             "--virtual-time-budget=5000", f"--user-data-dir={Path(d) / 'profile'}", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=timeout, check=False)
    m = re.search(r'<pre id="brsearch-probe">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"the page never reported (exit {proc.returncode}): {proc.stderr[-2000:]}"
    import html

    return json.loads(html.unescape(m.group(1)))
