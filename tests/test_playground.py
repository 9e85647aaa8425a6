"""The playground at / in a real headless Chromium against the real gunicorn server, with API keys on.
Each panel is driven as a person would (type, click, wait), and what it shows is checked against the
API itself, called with the same inputs. Every test ends with an empty browser console, save the
network lines of the refusals it asked for.

Screenshots of each panel go to logs/screenshots/, or to $PLAYGROUND_SCREENSHOTS. The docs' screenshots come
from `PLAYGROUND_ARTIFACTS=artifacts PLAYGROUND_SCREENSHOTS=docs/screenshots pytest tests/test_playground.py`
(the committed model instead of the tiny one)."""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
from selenium import webdriver
from selenium.webdriver import Chrome as WebDriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from seqmodels.artifacts import publish_version
from service.api.routes.playground import PAGE_POLICY
from tests.conftest import REPO, gunicorn_server
from tests.test_openai_client import metric

CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMEDRIVER is None, reason="needs Debian's chromium and chromium-driver (.ci/run installs them)"
)

KEY = "playground-key"
CAP = 100_000  # max_tokens allowed on this server: a generation only a Stop can end early
SCREENSHOTS = REPO / os.environ.get("PLAYGROUND_SCREENSHOTS", "logs/screenshots")
T = TypeVar("T")


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, cyrillic_artifacts: Path
) -> Iterator[str]:
    """A repository of two models: `shakespeare` (the default) and `cyrillic` (no classifier)."""
    chosen = os.environ.get("PLAYGROUND_ARTIFACTS")
    artifacts = REPO / chosen if chosen else request.getfixturevalue("tiny_artifacts")
    repository = tmp_path_factory.mktemp("playground-models")
    publish_version(artifacts, repository, "shakespeare")
    publish_version(cyrillic_artifacts, repository, "cyrillic")
    limits = {"MAX_TOKENS": str(CAP), "MAX_TOTAL_TOKENS": str(CAP)}
    env = {"MODEL_REPOSITORY": str(repository), "DEFAULT_MODEL": "shakespeare", "API_KEYS": f"other-key,{KEY}"}
    with gunicorn_server(artifacts, WORKERS="1", **env, **limits) as base:
        yield base


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: WebDriver, condition: Callable[[WebDriver], T], timeout: float = 30) -> T:
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def js(driver: WebDriver, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def api(server: str, path: str, body: dict[str, Any] | None = None, key: str | None = KEY) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if body is None:
        response = requests.get(f"{server}{path}", headers=headers, timeout=30)
    else:
        response = requests.post(f"{server}{path}", json=body, headers=headers, timeout=30)
    return response.json()


def console_errors(driver: WebDriver, *expected_statuses: int) -> list[str]:
    """SEVERE console entries since the last call, less the network lines of refusals a test asked for."""
    allowed = re.compile(r"the server responded with a status of (\d+)")
    errors = []
    for entry in driver.get_log("browser"):
        match = allowed.search(entry["message"])
        if entry["level"] == "SEVERE" and not (match and int(match.group(1)) in expected_statuses):
            errors.append(entry["message"])
    return errors


def load(driver: WebDriver, server: str, width: int = 1280, height: int = 1100) -> None:
    driver.set_window_size(width, height)
    driver.get(f"{server}/")
    wait(driver, lambda d: js(d, "return document.body.dataset.ready === 'true'"))


def enter_key(driver: WebDriver, key: str = KEY) -> None:
    field = driver.find_element(By.ID, "api-key")
    field.clear()
    field.send_keys(key, Keys.TAB)  # leaving the field applies it
    wait(driver, lambda d: d.find_element(By.ID, "models-list").get_attribute("data-state") == "done")


@pytest.fixture()
def page(browser: WebDriver, server: str) -> WebDriver:
    """A freshly loaded page (no key in memory: /v1/models is refused once) with the key entered."""
    load(browser, server)
    enter_key(browser)
    assert console_errors(browser, 401) == []
    return browser


def fill(driver: WebDriver, element_id: str, text: str) -> WebElement:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(text)
    return field


def paste(driver: WebDriver, element_id: str, text: str) -> None:
    """Long text, as a paste puts it: typing thousands of characters with send_keys takes seconds."""
    js(
        driver,
        "const field = document.getElementById(arguments[0]); field.value = arguments[1];"
        "field.dispatchEvent(new Event('input', {bubbles: true}));",
        element_id,
        text,
    )


def shoot(element: WebElement, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    element.parent.execute_script("document.activeElement.blur(); arguments[0].scrollIntoView()", element)
    assert element.screenshot(str(SCREENSHOTS / f"{name}.png"))


def state(driver: WebDriver, element_id: str) -> str | None:
    value: str | None = driver.find_element(By.ID, element_id).get_attribute("data-state")
    return value


def status(driver: WebDriver, element_id: str) -> str:
    return str(js(driver, "return document.getElementById(arguments[0]).textContent", element_id))


# --------------------------------------------------------------------------- page and headers


def test_page_is_served_with_a_strict_policy(server: str) -> None:
    page = requests.get(f"{server}/", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    policy = page.headers["Content-Security-Policy"]
    assert policy == PAGE_POLICY
    assert "unsafe" not in policy and "script-src 'self';" in policy and "default-src 'none'" in policy
    assert page.headers["X-Frame-Options"] == "DENY" and page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert "<script" in page.text and "<script>" not in page.text and " style=" not in page.text  # nothing inline
    for asset, kind in (("/playground/playground.js", "text/javascript"), ("/playground/playground.css", "text/css")):
        response = requests.get(f"{server}{asset}", timeout=10)
        assert response.status_code == 200 and response.headers["Content-Type"].startswith(kind)
        assert asset in page.text
    assert "innerHTML" not in requests.get(f"{server}/playground/playground.js", timeout=10).text


# --------------------------------------------------------------------------- models and keys


def test_models_panel_shows_v1_models(page: WebDriver, server: str) -> None:
    cards = [card for card in api(server, "/v1/models")["data"] if "@" in card["id"]]  # the loaded versions
    shown = js(
        page,
        "return [...document.querySelectorAll('#models-list .card')]"
        ".map(c => [c.dataset.id, Number(c.dataset.parameters), c.textContent])",
    )
    assert [(i, parameters) for i, parameters, _ in shown] == [(c["id"], c["lm"]["parameters"]) for c in cards]
    assert [i for i, _, _ in shown] == ["cyrillic@1", "shakespeare@1"]
    cyrillic, shakespeare = (text for _, _, text in shown)
    lm = cards[1]["lm"]
    assert f"{lm['parameters']:,}" in shakespeare and f"{lm['metrics']['test_bpc']:.3f}" in shakespeare
    assert all(label in shakespeare for label in cards[1]["classifier"]["labels"])
    assert "serving, default" in shakespeare and "classifier" + "none" in cyrillic.replace(" ", "")
    assert "default shakespeare@1" in status(page, "model-summary")
    shoot(page.find_element(By.ID, "models"), "models")
    assert console_errors(page) == []


def test_the_model_picker_chooses_the_model_of_every_panel(page: WebDriver, server: str) -> None:
    picker = page.find_element(By.ID, "model-picker")
    options = [o.get_attribute("value") for o in picker.find_elements(By.TAG_NAME, "option")]
    assert options == ["cyrillic", "cyrillic@1", "shakespeare", "shakespeare@1"]
    assert picker.get_attribute("value") == "shakespeare"  # the default model
    Select(picker).select_by_value("cyrillic")
    fill(page, "gen-prompt", "")
    fill(page, "gen-max-tokens", "40")
    fill(page, "gen-seed", "2")
    page.find_element(By.ID, "gen-start").click()
    wait(page, lambda d: state(d, "gen-output") == "done")
    settings = {"prompt": "", "max_tokens": 40, "seed": 2, "temperature": 0.8, "top_p": 0.95}  # the form's
    expected = api(server, "/v1/generate", {"model": "cyrillic", **settings})
    assert completion_text(page) == expected["choices"][0]["text"]
    assert re.search(r"[\u0400-\u04ff]", completion_text(page))  # the Russian model's script
    fill(page, "classify-text", "Утром над рекой")
    page.find_element(By.ID, "classify-start").click()
    wait(page, lambda d: state(d, "classify-results") == "error")
    refusal = api(server, "/v1/classify", {"model": "cyrillic", "texts": ["a"]})["error"]["message"]
    assert status(page, "classify-status") == refusal and "without a classifier" in refusal
    Select(picker).select_by_value("shakespeare@1")
    page.find_element(By.ID, "classify-start").click()
    wait(page, lambda d: state(d, "classify-results") == "done")
    assert console_errors(page, 400) == []


def test_the_chat_panel_plays_a_scene(page: WebDriver, server: str) -> None:
    log = page.find_element(By.ID, "chat-log")
    fill(page, "chat-user", "Horatio")
    fill(page, "chat-text", "What news, my lord?")
    page.find_element(By.ID, "chat-send").click()
    wait(page, lambda d: "." in status(d, "chat-status") and "speaking" not in status(d, "chat-status"))
    speakers = [e.text for e in log.find_elements(By.CSS_SELECTOR, ".speaker")]
    assert speakers == ["HORATIO", "HAMLET"]
    first = log.find_elements(By.CSS_SELECTOR, ".words")[1].get_attribute("textContent") or ""
    assert "\n\n" not in first and status(page, "chat-status").startswith("HAMLET ")
    fill(page, "chat-text", "Stay, speak!")
    page.find_element(By.ID, "chat-text").send_keys(Keys.CONTROL, Keys.ENTER)  # Ctrl+Enter speaks too
    wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat-log .speech")) == 4 and status(d, "chat-status"))
    wait(page, lambda d: "speaking" not in status(d, "chat-status"))
    assert [e.text for e in log.find_elements(By.CSS_SELECTOR, ".speaker")] == ["HORATIO", "HAMLET"] * 2
    # The conversation the page kept is the one the API answers for: the same scene, replayed, is accepted.
    lines = [e.get_attribute("textContent") for e in log.find_elements(By.CSS_SELECTOR, ".words")]
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "name": "HORATIO" if i % 2 == 0 else "HAMLET", "content": t}
        for i, t in enumerate(lines)
    ]
    reply = api(server, "/v1/chat/completions", {"model": "shakespeare", "messages": messages, "max_tokens": 5})
    assert reply["choices"][0]["message"]["name"] == "HAMLET"
    shoot(page.find_element(By.ID, "chat"), "chat")
    page.find_element(By.ID, "chat-clear").click()
    assert log.find_elements(By.CSS_SELECTOR, ".speech") == []
    assert console_errors(page) == []


def test_without_a_key_the_refusal_is_shown_and_with_one_it_works(browser: WebDriver, server: str) -> None:
    load(browser, server)
    refusal = api(server, "/v1/models", key=None)["error"]["message"]
    wait(browser, lambda d: state(d, "models-list") == "error")
    assert status(browser, "models-status") == refusal
    assert status(browser, "model-summary") == refusal
    assert "attention" in (browser.find_element(By.ID, "api-key").get_attribute("class") or "")

    fill(browser, "gen-max-tokens", "20")
    browser.find_element(By.ID, "gen-start").click()
    wait(browser, lambda d: state(d, "gen-output") == "error")
    assert status(browser, "gen-status") == refusal
    fill(browser, "next-text", "Ha")
    wait(browser, lambda d: status(d, "next-status") == refusal)
    assert browser.find_elements(By.CSS_SELECTOR, "#next-bars li") == []

    browser.find_element(By.ID, "api-key").send_keys("not-the-key", Keys.TAB)  # a wrong key is refused the same way
    browser.find_element(By.ID, "gen-start").click()
    wait(browser, lambda d: state(d, "gen-output") == "error")
    assert status(browser, "gen-status") == refusal

    field = browser.find_element(By.ID, "api-key")
    field.clear()
    field.send_keys(KEY, Keys.TAB)
    wait(browser, lambda d: state(d, "models-list") == "done")
    assert status(browser, "models-status") == ""
    browser.find_element(By.ID, "gen-start").click()
    wait(browser, lambda d: state(d, "gen-output") == "done")
    assert status(browser, "gen-status").startswith("Done: 20 characters")
    assert console_errors(browser, 401) == []

    load(browser, server)  # the key lived in the page's memory only
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == ""
    wait(browser, lambda d: state(d, "models-list") == "error")
    assert console_errors(browser, 401) == []


# --------------------------------------------------------------------------- generate

RECORD_LENGTHS = """
const completion = document.querySelector('#gen-output .completion');
window.lengths = [];
new MutationObserver(() => window.lengths.push(completion.textContent.length))
  .observe(completion, {subtree: true, childList: true, characterData: true});
"""


def completion_text(driver: WebDriver) -> str:
    return str(js(driver, "return document.querySelector('#gen-output .completion').textContent"))


def test_generate_streams_the_text_the_api_generates(page: WebDriver, server: str) -> None:
    settings = {"max_tokens": 1500, "temperature": 0.8, "top_p": 0.95, "seed": 11}
    fill(page, "gen-prompt", "ROMEO\n")
    fill(page, "gen-max-tokens", "1500")
    fill(page, "gen-temperature", "0.8")
    fill(page, "gen-top-p", "0.95")
    fill(page, "gen-seed", "11")
    js(page, RECORD_LENGTHS)
    page.find_element(By.ID, "gen-start").click()
    wait(page, lambda d: state(d, "gen-output") == "done", timeout=60)

    expected = api(server, "/v1/generate", {"prompt": "ROMEO\n", **settings})["choices"][0]
    lengths = js(page, "return window.lengths")
    grown = [n for n in lengths if n > 0]
    assert len(set(grown)) >= 3 and grown == sorted(grown), lengths  # it arrived in pieces, and only grew
    assert completion_text(page) == expected["text"]
    assert page.find_element(By.ID, "gen-output").get_attribute("data-finish-reason") == expected["finish_reason"]
    assert status(page, "gen-status") == f"Done: {len(expected['text'])} characters (finish reason: length)."
    assert page.find_element(By.ID, "gen-start").is_enabled()
    assert not page.find_element(By.ID, "gen-stop").is_enabled()

    # A stop string, written with an escape, ends it the way the API does.
    fill(page, "gen-max-tokens", "200")
    fill(page, "gen-stop-text", r"\n\n")
    page.find_element(By.ID, "gen-start").click()
    wait(page, lambda d: state(d, "gen-output") == "done", timeout=60)
    stopped = api(server, "/v1/generate", {"prompt": "ROMEO\n", **settings, "max_tokens": 200, "stop": "\n\n"})
    assert completion_text(page) == stopped["choices"][0]["text"]
    fill(page, "gen-max-tokens", "300")
    page.find_element(By.ID, "gen-start").click()
    wait(page, lambda d: state(d, "gen-output") == "done", timeout=60)
    shoot(page.find_element(By.ID, "generate"), "generate")
    assert console_errors(page) == []


def test_stop_and_escape_end_the_stream_on_the_server(page: WebDriver, server: str) -> None:
    cancelled = metric(server, "charlm_generations_cancelled_total")
    fill(page, "gen-max-tokens", str(CAP))
    fill(page, "gen-seed", "1")
    for stop_with in ("button", "escape"):
        prompt = page.find_element(By.ID, "gen-prompt")
        prompt.send_keys(Keys.CONTROL, Keys.ENTER)  # the keyboard shortcut starts it
        wait(page, lambda d: len(completion_text(d)) >= 200, timeout=60)
        if stop_with == "button":
            page.find_element(By.ID, "gen-stop").click()
        else:
            prompt.send_keys(Keys.ESCAPE)
        wait(page, lambda d: state(d, "gen-output") == "stopped")
        shown = len(completion_text(page))
        assert status(page, "gen-status") == f"Stopped after {shown} characters."
        assert page.find_element(By.ID, "gen-start").is_enabled()

        deadline = time.monotonic() + 30  # the server notices the closed connection and stops generating
        while metric(server, "charlm_generations_cancelled_total") < cancelled + 1:
            assert time.monotonic() < deadline, "the server never noticed the Stop"
            time.sleep(0.05)
        cancelled += 1
        generated = metric(server, "charlm_tokens_generated_total")
        time.sleep(0.3)
        assert metric(server, "charlm_tokens_generated_total") == generated  # nothing more for the dead stream
        assert len(completion_text(page)) == shown < CAP / 10  # and the text stopped growing
    assert console_errors(page) == []


def test_api_errors_show_the_envelope_message(page: WebDriver, server: str) -> None:
    fill(page, "gen-top-p", "0")
    page.find_element(By.ID, "gen-start").click()
    wait(page, lambda d: state(d, "gen-output") == "error")
    expected = api(server, "/v1/generate", {"prompt": "ROMEO\n", "top_p": 0, "stream": True})["error"]["message"]
    assert status(page, "gen-status") == expected and "top_p" in expected
    assert page.find_element(By.ID, "gen-status").get_attribute("data-kind") == "error"

    paste(page, "score-text", "x" * 5000)  # over MAX_TEXT_CHARS
    page.find_element(By.ID, "score-start").click()
    wait(page, lambda d: state(d, "score-results") == "error")
    expected = api(server, "/v1/score", {"texts": ["x" * 5000], "include_tokens": True})["error"]["message"]
    assert status(page, "score-status") == expected

    fill(page, "classify-text", " ")  # nothing to send: the page says so itself
    page.find_element(By.ID, "classify-start").click()
    assert status(page, "classify-status") == "Enter a passage to classify."
    assert console_errors(page, 400) == []


# --------------------------------------------------------------------------- next character

READ_BARS = """
return [...document.querySelectorAll(arguments[0] + ' li')].map(li => ({
  data: {...li.dataset}, glyph: li.querySelector('.bar-label').textContent,
  value: li.querySelector('.bar-value').textContent, width: li.querySelector('.bar-fill').style.width,
  top: li.classList.contains('top')}));
"""
GLYPHS = {" ": "␣", "\n": "⏎", "\t": "⇥"}


def assert_percent(shown: str, p: float) -> None:
    """As the page writes a probability: 1 decimal from 10%, 2 below, and <0.01% for less."""
    if p < 0.0001:
        assert shown == "<0.01%"
        return
    decimals = 1 if p >= 0.1 else 2
    assert (
        re.fullmatch(rf"\d+\.\d{{{decimals}}}%", shown)
        and abs(float(shown[:-1]) - p * 100) <= 0.5 * 10**-decimals + 1e-9
    )


def next_token_requests(server: str) -> float:
    return metric(server, re.escape('charlm_http_requests_total{method="POST",route="/v1/next-token",status="200"}'))


def wait_for_bars(driver: WebDriver, text: str) -> None:
    """Until the bars answer `text` (the page records the context of the answer it drew)."""
    wait(driver, lambda d: js(d, "return document.getElementById('next-bars').dataset.text") == text)


def test_next_character_bars_match_the_api(page: WebDriver, server: str) -> None:
    before = next_token_requests(server)
    fill(page, "next-top-k", "100")  # every character, so that whitespace is among them
    typed = "To be, or not to be"
    field = fill(page, "next-text", typed)
    for text in (typed, typed + ",\n"):
        if text != typed:
            field.send_keys(",", Keys.ENTER)
        wait_for_bars(page, text)
        expected = api(server, "/v1/next-token", {"text": text, "top_k": 100})
        candidates = expected["candidates"]
        bars = js(page, READ_BARS, "#next-bars")
        assert [b["data"]["token"] for b in bars] == [c["token"] for c in candidates]
        assert [float(b["data"]["prob"]) for b in bars] == [c["prob"] for c in candidates]
        assert [b["glyph"] for b in bars] == [GLYPHS.get(c["token"], c["token"]) for c in candidates]
        assert {"␣", "⏎"} <= {b["glyph"] for b in bars}  # whitespace is shown visibly
        assert [b["top"] for b in bars] == [True] + [False] * (len(candidates) - 1)
        for bar, candidate in zip(bars, candidates, strict=True):
            assert float(bar["width"].removesuffix("%")) == pytest.approx(candidate["prob"] * 100, abs=1e-3)
            assert_percent(bar["value"], candidate["prob"])
        assert status(page, "next-status") == f"Entropy of the next character: {expected['entropy_bits']:.3f} bits."
    # Debounced: 24 keystrokes made a handful of requests, not one each.
    assert next_token_requests(server) - before <= 5

    fill(page, "next-top-k", "8")
    fill(page, "next-text", "But soft, what light through yonder window b")
    wait_for_bars(page, "But soft, what light through yonder window b")
    assert len(page.find_elements(By.CSS_SELECTOR, "#next-bars li")) == 8
    shoot(page.find_element(By.ID, "next"), "next-character")
    assert console_errors(page) == []


# --------------------------------------------------------------------------- score

READ_HEATMAPS = """
return [...document.querySelectorAll('#score-results .heatmap')].map(map =>
  [...map.children].map(span => [span.textContent, span.dataset.logprob, span.className]));
"""
EDGES = [1, 2, 3, 4, 6, 8, 11]


def bin_of(bits: float) -> int:
    return sum(bits >= edge for edge in EDGES)


def test_score_heatmap_matches_the_api(page: WebDriver, server: str) -> None:
    texts = [
        "Shall I compare thee to a summer's day?",
        "Thou art more lovely and more temperate:\nRough winds do shake the darling buds of May,\n"
        "And summer's lease hath all too short a date;",
    ]
    fill(page, "score-text", f"{texts[0]}\n---\n{texts[1]}")
    page.find_element(By.ID, "score-start").click()
    wait(page, lambda d: state(d, "score-results") == "done")
    expected = api(server, "/v1/score", {"texts": texts, "include_tokens": True})["results"]

    heatmaps = js(page, READ_HEATMAPS)
    assert len(heatmaps) == 2
    for spans, result in zip(heatmaps, expected, strict=True):
        assert [float(logprob) for _, logprob, _ in spans] == [t["logprob"] for t in result["tokens"]]
        assert "".join(text.replace("⏎\n", "\n") for text, _, _ in spans) == result["text"]
        assert [cls for _, _, cls in spans] == [f"c b{bin_of(-t['logprob'] / math.log(2))}" for t in result["tokens"]]
    stats = [e.text for e in page.find_elements(By.CSS_SELECTOR, "#score-results .stats")]
    for line, result in zip(stats, expected, strict=True):
        assert f"{result['bits_per_char']:.3f} bits/char" in line and f"perplexity {result['perplexity']:.2f}" in line
    chars = sum(r["n_chars"] for r in expected)
    bits = -sum(r["logprob"] for r in expected) / chars / math.log(2)
    summary = page.find_element(By.ID, "score-summary")
    assert float(summary.get_attribute("data-bits-per-char") or "nan") == pytest.approx(bits, rel=1e-12)
    assert float(summary.get_attribute("data-perplexity") or "nan") == pytest.approx(2**bits, rel=1e-12)
    assert f"{bits:.3f} bits/char" in summary.text and f"perplexity {2**bits:.2f}" in summary.text
    assert len(page.find_elements(By.CSS_SELECTOR, "#score-legend .swatch")) == len(EDGES) + 1

    # The exact value on hover, and from the keyboard.
    tokens = expected[0]["tokens"]
    span = page.find_elements(By.CSS_SELECTOR, "#score-results .heatmap")[0].find_elements(By.CSS_SELECTOR, ".c")[6]
    ActionChains(page).move_to_element(span).perform()
    readout = status(page, "score-readout")
    assert readout == span.get_attribute("title")
    assert readout.startswith("“I” (U+0049) at 6: ") and f"{-tokens[6]['logprob'] / math.log(2):.3f} bits" in readout
    heatmap = page.find_elements(By.CSS_SELECTOR, "#score-results .heatmap")[0]
    heatmap.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
    assert status(page, "score-readout").startswith("“a” (U+0061) at 2: ")
    heatmap.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, Keys.ARROW_LEFT)
    assert status(page, "score-readout").startswith("space (U+0020) at 5: ")
    heatmap.send_keys(Keys.END)
    assert status(page, "score-readout").startswith("“?” (U+003F) at 38: ")
    ActionChains(page).move_to_element(page.find_element(By.ID, "score-title")).perform()
    shoot(page.find_element(By.ID, "score"), "score")
    assert console_errors(page) == []


WATCH_RENDERING = """
window.longest = 0;
new PerformanceObserver(list => {
  for (const entry of list.getEntries()) window.longest = Math.max(window.longest, entry.duration);
}).observe({type: 'longtask'});
window.frames = 0;
(function tick() { window.frames += 1; requestAnimationFrame(tick); })();
new MutationObserver(() => {
  if (window.firstSpanFrame === undefined && document.querySelector('#score-results .c')) {
    window.firstSpanFrame = window.frames;
  }
}).observe(document.getElementById('score-results'), {childList: true, subtree: true});
"""


def test_long_texts_render_in_batches_and_stay_responsive(page: WebDriver, server: str) -> None:
    passage = "Now is the winter of our discontent made glorious summer by this sun of York. " * 60
    texts = [passage[i * 7 : i * 7 + 4000] for i in range(32)]
    paste(page, "score-text", "\n---\n".join(texts))
    js(page, WATCH_RENDERING)
    page.find_element(By.ID, "score-start").click()
    wait(page, lambda d: state(d, "score-results") == "done", timeout=60)
    frames, longest = js(page, "return [window.frames - window.firstSpanFrame, window.longest]")
    counts = js(page, "return [...document.querySelectorAll('#score-results .heatmap')].map(m => m.children.length)")
    assert counts == [len(t) for t in texts]
    print(f"128,000 characters drawn over {frames} frames; longest main-thread task {longest:.0f} ms")
    assert frames >= 30  # drawn in batches, with painting and input handled in between
    assert longest < 1000  # in one piece it blocks the page for about 0.4 s on an idle machine
    assert console_errors(page) == []


# --------------------------------------------------------------------------- classify


def test_classify_bars_match_the_api(page: WebDriver, server: str) -> None:
    texts = [
        "My liege, the French are landed and the Dauphin leads them on; the crown, the crown!",
        "If music be the food of love, play on;\nGive me excess of it, that, surfeiting,\nThe appetite may sicken.",
        "<img src=x onerror=alert(1)> & <b>not bold</b>",
    ]
    fill(page, "classify-text", "\n---\n".join(texts))
    page.find_element(By.ID, "classify-start").click()
    wait(page, lambda d: state(d, "classify-results") == "done")
    expected = api(server, "/v1/classify", {"texts": texts})["results"]
    articles = page.find_elements(By.CSS_SELECTOR, "#classify-results article")
    assert len(articles) == 3
    for i, (article, result) in enumerate(zip(articles, expected, strict=True)):
        bars = js(page, READ_BARS, f"#classify-results article:nth-child({i + 1}) .bars")
        assert {b["data"]["label"]: float(b["data"]["prob"]) for b in bars} == result["probabilities"]
        assert [b["data"]["label"] for b in bars if b["top"]] == [result["label"]]
        assert [float(b["data"]["prob"]) for b in bars] == sorted(result["probabilities"].values(), reverse=True)
        assert article.find_element(By.CSS_SELECTOR, ".label").text == result["label"]
        assert article.find_element(By.CSS_SELECTOR, ".excerpt").get_attribute("textContent") == texts[i]
    # User text is shown as text, never parsed as HTML.
    assert page.find_elements(By.CSS_SELECTOR, "#classify-results img, #classify-results b") == []
    paste(page, "classify-text", "\n---\n".join(texts[:2]))
    page.find_element(By.ID, "classify-start").click()
    wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#classify-results article")) == 2)
    shoot(page.find_element(By.ID, "classify"), "classify")
    assert console_errors(page) == []


# --------------------------------------------------------------------------- phone width


def test_phone_width_has_no_horizontal_overflow(browser: WebDriver, server: str) -> None:
    load(browser, server, 390, 844)
    enter_key(browser)
    assert js(browser, "return window.innerWidth") <= 400
    fill(browser, "next-text", "O Romeo, Romeo, wherefore art thou R")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#next-bars li")) == 10)
    browser.find_element(By.ID, "score-start").click()
    wait(browser, lambda d: state(d, "score-results") == "done")
    overflow = "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    assert js(browser, overflow) <= 0
    browser.execute_cdp_cmd(
        "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
    )
    try:
        assert js(browser, overflow) <= 0
        browser.set_window_size(390, 1300)  # tall enough for the whole panel
        shoot(browser.find_element(By.ID, "score"), "phone-dark")
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    assert console_errors(browser, 401) == []


def test_keyboard_reaches_every_control_in_order(page: WebDriver) -> None:
    page.find_element(By.ID, "api-key").click()
    seen = []
    for _ in range(40):
        page.switch_to.active_element.send_keys(Keys.TAB)
        seen.append(js(page, "return document.activeElement.id || document.activeElement.tagName"))
    order = ["gen-prompt", "gen-max-tokens", "gen-temperature", "gen-top-k", "gen-top-p", "gen-seed"]
    order += ["gen-stop-text", "gen-start", "gen-output", "next-text", "next-top-k", "classify-text"]
    order += ["classify-start", "score-text", "score-start"]
    assert [s for s in seen if s in order][: len(order)] == order, seen
    labelled = js(
        page,
        "return [...document.querySelectorAll('input, textarea')].every(e => e.labels.length > 0)",
    )
    assert labelled
    assert console_errors(page) == []
