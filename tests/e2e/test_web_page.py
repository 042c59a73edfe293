"""The web page in headless Chromium: chat with the swarm, see the swarm map."""

import os

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from conftest import API_KEY

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path):
    assert os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER), \
        "install the Debian packages chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--no-first-run", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_chat_streams_and_the_map_shows_every_node(swarm, browser, output_dir):
    browser.get(swarm.url + "/")
    wait = WebDriverWait(browser, 120)

    # The swarm map: every node with its range, nothing missing.
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#nodes .node")) == 2)
    rows = {row.get_attribute("data-peer"): row.text for row in
            browser.find_elements(By.CSS_SELECTOR, "#nodes .node")}
    assert set(rows) == {swarm.a.peer_id, swarm.b.peer_id}
    assert "0..15" in rows[swarm.a.peer_id]
    assert "15..30" in rows[swarm.b.peer_id]
    # Each node's reachability and the gateway's path to it.
    assert all("public (direct)" in text for text in rows.values()), rows
    assert "All layers served by 2 node(s)." in browser.find_element(By.ID, "summary").text
    assert not browser.find_elements(By.CSS_SELECTOR, "#layers .missing")

    # A chat message, answered by streaming.
    browser.find_element(By.ID, "key").send_keys(API_KEY)
    browser.find_element(By.ID, "prompt").send_keys("What is the capital of France?")
    browser.find_element(By.ID, "send").click()
    reply = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant"))
    wait.until(lambda d: reply.get_attribute("data-state") in ("done", "failed"))
    assert reply.get_attribute("data-state") == "done", reply.text
    assert len(reply.text.strip()) > 0
    browser.save_screenshot(str(output_dir / "web-page.png"))
