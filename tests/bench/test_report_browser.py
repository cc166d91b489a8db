"""The HTML report, rendered in headless Chromium: the score table and every plot are there and non-empty."""

import json
import re
import shutil
import subprocess

import pytest

from kvlife.bench import runner
from kvlife.bench.report import write_html
from kvlife.bench.runner import BenchConfig
from tiny import ByteTokenizer, tiny_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Runs after load: records what the browser actually rendered on <body data-rendered=...>.
PROBE = """<script>
window.addEventListener("load", () => {
  const figures = [...document.querySelectorAll("figure img")].map(img => ({
    id: img.closest("figure").id, width: img.naturalWidth, height: img.naturalHeight, shown: img.width}));
  const cells = [...document.querySelectorAll("#scores tbody tr")].map(tr => tr.children.length);
  const runs = document.querySelectorAll("#runs tbody tr").length;
  const dense = [...document.querySelectorAll("#vs-dense tbody tr")].map(tr => tr.children.length);
  const scroll = document.documentElement.scrollWidth - document.documentElement.clientWidth;
  document.body.setAttribute("data-rendered", JSON.stringify({figures, cells, runs, dense, scroll,
    width: window.innerWidth}));
});
</script>"""


@pytest.fixture
def runs(tmp_path, monkeypatch):
    from kvlife.bench.tasks.kv import KVRetrieval

    monkeypatch.setitem(KVRetrieval.profiles, "test",
                        {"samples": 1, "pairs": 2, "turns": 2, "context_tokens": 40, "dense_json": False})
    model = tiny_model()
    out = []
    for method, mode in (
        ("dense", "multi-turn"),
        ("dense", "multi-request"),
        ("streamingllm(n_local=8)", "multi-turn"),
    ):
        config = BenchConfig(
            model="tiny", tasks=["kv"], mode=mode, method=method, profile="test", prompt_format="plain"
        )
        out.append(
            runner.run(
                config,
                out=tmp_path / f"{method[:6]}-{mode}",
                model=model,
                tokenizer=ByteTokenizer(),
                progress=False,
            )
        )
    return out


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)"
)
def test_report_renders_table_and_every_plot(tmp_path, runs):
    page = write_html(runs, tmp_path / "report.html")
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            "--window-size=1280,900",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    found = re.search(r'data-rendered="([^"]*)"', dom)
    assert found, f"the page did not finish loading in chromium: {dom[:300]!r}"
    rendered = json.loads(found.group(1).replace("&quot;", '"'))
    assert {f["id"] for f in rendered["figures"]} == {"plot-turns", "plot-bytes", "plot-modes"}
    for figure in rendered["figures"]:
        assert figure["width"] > 100 and figure["height"] > 100 and figure["shown"] > 0, figure
    # 3 runs x (1 task + average), each row: run, task, n, 2 turns, all, NLL, =dense, KV MiB
    assert rendered["cells"] == [9] * 6
    assert rendered["runs"] == 3
    # the streamingllm run against its dense sibling: run, task, n, 2 turns, all; and the all-tasks row
    assert rendered["dense"] == [6, 6]
    assert rendered["width"] == 1280 and rendered["scroll"] <= 0, "the page scrolls sideways at 1280 px"


def _pixels(page: str, plot: str):
    import base64
    import io

    import matplotlib.image

    data = re.search(rf"id='plot-{plot}'><img alt='{plot}' src='data:image/png;base64,([^']+)'", page).group(
        1
    )
    image = matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png")[..., :3]
    return {tuple(int(round(c * 255)) for c in pixel) for pixel in image.reshape(-1, 3)}


def test_each_run_keeps_one_colour_in_every_plot(tmp_path, runs):
    from matplotlib import colormaps

    page = write_html(runs, tmp_path / "report.html").read_text()
    palette = [tuple(int(round(c * 255)) for c in colour) for colour in colormaps["tab10"].colors[:3]]
    for plot in ("turns", "modes"):
        found = _pixels(page, plot)
        assert all(colour in found for colour in palette), plot  # every run's colour is drawn
        assert tuple(int(round(c * 255)) for c in colormaps["tab10"].colors[3]) not in found


def test_a_turn_averages_only_the_tasks_that_have_it():
    from kvlife.bench.report import turn_means

    summary = {"tasks": {"kv": {"per_turn": {"1": 1.0, "2": 1.0, "3": 1.0}},
                         "qa_eng": {"per_turn": {"1": 0.0, "2": 0.5}}}}
    assert turn_means(summary) == {1: (0.5, 2), 2: (0.75, 2), 3: (1.0, 1)}
