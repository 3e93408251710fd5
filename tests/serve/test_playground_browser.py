"""The playground in a real headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium; nothing is downloaded): type a prompt, watch the text stream in, check the routing
heatmap against the model's own router, click a token, stop a generation, refuse an empty prompt.

The README's screenshot (docs/playground.png) comes from this run:
    MEGAMOE_SCREENSHOT=docs/playground.png .venv/bin/python -m pytest -q tests/serve/test_playground_browser.py
"""
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from megamoe.inference import load_model

from test_playground import router_oracle  # noqa: E402  (pytest puts this folder on sys.path)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
PROMPT = "JULIET:"
MISSING = ("the playground test needs Chromium and its driver from the distribution "
           "(Debian: apt-get install chromium chromium-driver; `make test` installs them when run as root) "
           "and Selenium (pip install -e '.[dev]')")


def browser_binaries() -> tuple[str, str]:
    chrome = os.environ.get("MEGAMOE_CHROMIUM") or next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = os.environ.get("MEGAMOE_CHROMEDRIVER") or shutil.which("chromedriver")
    if importlib.util.find_spec("selenium") is None:
        chrome = None
    if not (chrome and driver):
        pytest.fail(f"missing: {MISSING}", pytrace=False)
    return chrome, driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    """tools/serve.py on a free loopback port, serving the trained tiny model's HF directory."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "tools/serve.py", "--model", str(served.hf_dir), "--port", str(port)],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the server did not come up:\n{log.read_text()}")
            time.sleep(0.3)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def page(server):
    chrome, driver = browser_binaries()
    os.environ.setdefault("SE_OFFLINE", "true")      # Selenium Manager must not look for downloads
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    # no host but this machine resolves: the page must work offline and reach nothing else
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(driver), options=opts)
    d.get(server)
    yield d
    d.quit()


def css(d, sel):
    from selenium.webdriver.common.by import By
    return d.find_elements(By.CSS_SELECTOR, sel)


def wait_for(d, cond, timeout=60, what="condition"):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait
    try:
        return WebDriverWait(d, timeout, poll_frequency=0.05).until(lambda _: cond())
    except TimeoutException:
        pytest.fail(f"timed out waiting for {what}; the page's status reads {status(d)!r}", pytrace=False)


def status(d) -> str:
    return css(d, "#mm-status")[0].text


def set_prompt(d, text):
    box = wait_for(d, lambda: (css(d, "#mm-prompt textarea") or [None])[0], what="the prompt box")
    box.clear()
    if text:
        box.send_keys(text)


def watch_output(d):
    """Record, inside the page every 2 ms, each value the continuation box takes."""
    d.execute_script("""
        window.mmSeen = []; clearInterval(window.mmTimer);
        window.mmTimer = setInterval(() => { const t = document.querySelector('#mm-output textarea');
          const v = t ? t.value : ''; if (window.mmSeen[window.mmSeen.length - 1] !== v) window.mmSeen.push(v); }, 2);""")


def test_empty_prompt_gets_a_message_and_the_server_stays_up(page):
    set_prompt(page, "")
    css(page, "#mm-generate")[0].click()
    wait_for(page, lambda: "The prompt is empty" in status(page), what="the empty-prompt message")


def set_max_new(d, n: int):
    box = css(d, "#mm-max-new input[type=number]")[0]
    box.clear()
    box.send_keys(f"{n}\t")


def test_generation_streams_and_the_heatmap_is_the_routers_choice(page, served, tmp_path):
    set_prompt(page, PROMPT)
    set_max_new(page, 200)
    watch_output(page)
    css(page, "#mm-generate")[0].click()
    wait_for(page, lambda: status(page).startswith("done"), what="the generation to finish")
    wait_for(page, lambda: css(page, "#mm-heatmap td.mm-cell"), what="the heatmap")
    text = css(page, "#mm-output textarea")[0].get_attribute("value")
    seen = [s for s in page.execute_script("return window.mmSeen") if s]
    assert text and len(seen) >= 3 and all(text.startswith(s) for s in seen), seen   # streamed, token by token

    lm = load_model(served.hf_dir)
    heads = css(page, "#mm-heatmap th[data-id]")
    ids = [int(h.get_attribute("data-id")) for h in heads]
    n_prompt = sum("mm-gen" not in h.get_attribute("class") for h in heads)
    assert ids[:n_prompt] == lm.tokenizer.encode(PROMPT)
    assert lm.tokenizer.decode(ids[n_prompt:]) == text
    assert f"done: {len(ids) - n_prompt} new tokens" in status(page)

    oracle = router_oracle(lm.model, ids)
    rows = css(page, "#mm-heatmap tbody tr[data-layer]")
    moe_layers = [i for i in range(lm.config.num_hidden_layers) if lm.config.is_moe_layer(i)]
    assert [int(r.get_attribute("data-layer")) for r in rows] == moe_layers
    for row, (indices_TK, weights_TK) in zip(rows, oracle):
        cells = row.find_elements("css selector", "td.mm-cell")
        assert len(cells) == len(ids)
        for t, cell in enumerate(cells):
            assert cell.get_attribute("data-experts") == ",".join(map(str, indices_TK[t].tolist()))
            weights = [float(w) for w in cell.get_attribute("data-weights").split(",")]
            assert weights == pytest.approx(weights_TK[t].tolist(), abs=1e-4)

    load_rows = css(page, "#mm-load tbody tr")
    assert len(load_rows) == len(moe_layers)
    for r in load_rows:
        shares = [int(c.text) for c in r.find_elements("css selector", "td[data-expert]")]
        assert len(shares) == lm.config.n_routed_experts and abs(sum(shares) - 100) <= len(shares) / 2

    # clicking a token shows its route through every MoE layer, and only that one
    t = n_prompt + 1
    css(page, f'#mm-heatmap td.mm-cell[data-token="{t}"]')[0].click()
    shown = wait_for(page, lambda: [r for r in css(page, ".mm-route") if r.is_displayed()], what="the route")
    assert len(shown) == 1 and shown[0].get_attribute("data-token") == str(t)
    route_rows = shown[0].find_elements("css selector", "tr[data-layer]")
    assert [int(r.get_attribute("data-layer")) for r in route_rows] == moe_layers
    first = sorted(zip(oracle[0][0][t].tolist(), oracle[0][1][t].tolist()), key=lambda p: -p[1])[0][0]
    assert route_rows[0].text.split()[1] == str(first)
    screenshot(page, tmp_path)


def screenshot(d, tmp_path):
    """The whole page, as the README shows it (MEGAMOE_SCREENSHOT=path also writes it there)."""
    height = d.execute_script("return document.documentElement.scrollHeight")
    d.set_window_size(1400, min(height + 200, 2400))     # + the browser's own chrome
    shot = tmp_path / "playground.png"
    assert d.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("MEGAMOE_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["MEGAMOE_SCREENSHOT"])
    d.set_window_size(1400, 1000)


def test_stop_ends_a_generation_and_shows_its_routing(page):
    set_prompt(page, PROMPT)
    set_max_new(page, 1000)
    watch_output(page)
    css(page, "#mm-generate")[0].click()
    wait_for(page, lambda: status(page).startswith("generating"), what="streaming to start")
    css(page, "#mm-stop")[0].click()
    wait_for(page, lambda: status(page).startswith("stopped"), what="the stop")
    n_gen = len(css(page, "#mm-heatmap th.mm-gen"))
    assert 0 < n_gen < 1000 and f"stopped: {n_gen} new tokens" in status(page)
    text = css(page, "#mm-output textarea")[0].get_attribute("value")
    assert text and text == page.execute_script("return window.mmSeen").pop()


def test_model_card_tab(page, served):
    tab = next(b for b in css(page, "button[role=tab]") if b.text.strip() == "Model card")
    tab.click()
    card = wait_for(page, lambda: (css(page, "#mm-card") or [None])[0], what="the model card").text
    assert "active per token" in card and "8 routed (top-2, sigmoid), 1 shared" in card
    assert re.search(r"context\s+1024", card)
